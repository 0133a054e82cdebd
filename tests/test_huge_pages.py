"""Quantized weight buffers in memory advised for transparent huge pages (mixprec.kernels.huge_pages)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import mixprec
from mixprec.kernels.huge_pages import HUGE_PAGE_BYTES, transparent_huge_pages, zeros_in_huge_pages

offered = pytest.mark.skipif(transparent_huge_pages() not in ("always", "madvise"),
                             reason="the kernel offers no transparent huge pages here")


def advised_for_huge_pages(address: int) -> bool:
    """Whether the mapping holding ``address`` carries MADV_HUGEPAGE (``hg`` among its VmFlags in /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                begin, end = (int(part, 16) for part in head.split("-"))
                inside = begin <= address < end
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.int8), ((0,), torch.uint8), ((4096, 1024), torch.int8),
                                         ((1024, 1023), torch.float16), ((HUGE_PAGE_BYTES // 4 + 7,), torch.float32)])
def test_zeros_in_huge_pages_are_zeros_of_the_shape_and_dtype(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    t = zeros_in_huge_pages(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert not t.any()
    if t.numel():
        t.view(-1)[-1] = 3  # writable to the last element
        assert int(t.view(-1)[-1]) == 3 and int(t.sum()) == 3


@offered
def test_buffers_from_two_mebibytes_are_advised_and_small_ones_are_plain() -> None:
    large = zeros_in_huge_pages((HUGE_PAGE_BYTES + 4096,), torch.uint8)
    assert large.data_ptr() % HUGE_PAGE_BYTES == 0  # whole huge pages from the first byte
    assert advised_for_huge_pages(large.data_ptr())
    assert not advised_for_huge_pages(large.data_ptr() + HUGE_PAGE_BYTES)  # the tail stays in 4 KiB pages
    small = zeros_in_huge_pages((HUGE_PAGE_BYTES - 1,), torch.uint8)
    assert not advised_for_huge_pages(small.data_ptr())


@offered
def test_quantized_modules_hold_their_codes_in_advised_memory_and_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4096, 1024), nn.Linear(2048, 2048), nn.Linear(1024, 4096))
    mixprec.quantize(model, mixprec.Policy([("0", "w4a8g32"), ("1", "w4g32")], default="w8g32"))
    for buffer in (model[0].codes_blocked, model[1].weight_packed, model[2].weight):
        assert advised_for_huge_pages(buffer.data_ptr())
    plain = copy.deepcopy(model)  # the same buffers copied into ordinary memory
    assert not advised_for_huge_pages(plain[0].codes_blocked.data_ptr())
    x = torch.randn(3, 4096)
    expected = model[0](x)
    assert torch.equal(plain[0](x), expected) and torch.equal(plain[2].weight, model[2].weight)
    path = tmp_path / "model.safetensors"
    mixprec.save(model, path)
    fresh = nn.Sequential(nn.Linear(4096, 1024), nn.Linear(2048, 2048), nn.Linear(1024, 4096))
    mixprec.load(fresh, path)
    assert torch.equal(fresh[0](x), expected)


def test_zeros_in_huge_pages_follow_the_default_device_and_refuse_negative_sizes() -> None:
    with torch.device("meta"):
        assert zeros_in_huge_pages((4096, 4096), torch.int8).is_meta
    with pytest.raises(ValueError, match=r"needs sizes >= 0, got \(4, -1\)"):
        zeros_in_huge_pages((4, -1), torch.int8)
