"""Quantized weight buffers in memory advised for transparent huge pages (mixprec.kernels.huge_pages)."""

from __future__ import annotations

import copy
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import mixprec
from mixprec.kernels import huge_pages, onednn_int8
from mixprec.kernels.huge_pages import (
    GATHER_ALIGNMENT,
    HUGE_PAGE_BYTES,
    collapse_into_huge_pages,
    gather_in_huge_pages,
    laid_one_after_another,
    transparent_huge_pages,
    zeros_in_huge_pages,
)

offered = pytest.mark.skipif(transparent_huge_pages() not in ("always", "madvise"),
                             reason="the kernel offers no transparent huge pages here")


def mapping_fields(address: int) -> dict[str, list[str]]:
    """The /proc/self/smaps fields of the mapping holding ``address`` (name -> the words after it)."""
    fields: dict[str, list[str]] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head, *rest = line.split()
            if "-" in head and ":" not in head:
                if fields is not None:
                    return fields
                begin, end = (int(part, 16) for part in head.split("-"))
                fields = {} if begin <= address < end else None
            elif fields is not None:
                fields[head.rstrip(":")] = rest
    if fields is None:
        raise AssertionError(f"no mapping holds {address:#x}")
    return fields


def from_own_mapping(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lies in a mapping of zeros_in_huge_pages (a fixed-size storage over a Python buffer)
    rather than memory from PyTorch's allocator (whose storages are resizable)."""
    return not tensor.untyped_storage().resizable()


def advised_for_huge_pages(address: int) -> bool:
    """Whether the mapping holding ``address`` carries MADV_HUGEPAGE (``hg`` among its VmFlags)."""
    return "hg" in mapping_fields(address)["VmFlags"]


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
def test_buffers_from_two_mebibytes_are_advised_and_small_ones_are_torch_zeros() -> None:
    large = zeros_in_huge_pages((HUGE_PAGE_BYTES + 4096,), torch.uint8)
    assert large.data_ptr() % HUGE_PAGE_BYTES == 0  # whole huge pages from the first byte
    assert advised_for_huge_pages(large.data_ptr())
    assert not advised_for_huge_pages(large.data_ptr() + HUGE_PAGE_BYTES)  # the tail stays in 4 KiB pages
    assert from_own_mapping(large) and not from_own_mapping(zeros_in_huge_pages((HUGE_PAGE_BYTES - 1,), torch.uint8))


@offered
def test_quantized_modules_hold_their_codes_in_advised_memory_and_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4096, 1024), nn.Linear(2048, 2048), nn.Linear(1024, 4096))
    mixprec.quantize(model, mixprec.Policy([("0", "w4a8g32"), ("1", "w4g32")], default="w8g32"))
    for buffer in (model[0].codes_blocked, model[1].weight_packed, model[2].weight):
        assert advised_for_huge_pages(buffer.data_ptr())
    plain = copy.deepcopy(model)  # the same buffers copied into PyTorch's memory
    assert not from_own_mapping(plain[0].codes_blocked)
    x = torch.randn(3, 4096)
    expected = model[0](x)
    assert torch.equal(plain[0](x), expected) and torch.equal(plain[2].weight, model[2].weight)
    path = tmp_path / "model.safetensors"
    mixprec.save(model, path)
    fresh = nn.Sequential(nn.Linear(4096, 1024), nn.Linear(2048, 2048), nn.Linear(1024, 4096))
    mixprec.load(fresh, path)
    assert torch.equal(fresh[0](x), expected)


def mixed_tensors() -> list[torch.Tensor]:
    """Tensors of several dtypes and sizes (odd byte counts, an empty one), 2.6 MB in all."""
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (1000, 1031), dtype=torch.uint8, generator=generator),
            torch.randn(333, 64, generator=generator).half(), torch.empty(0), torch.randn(7, generator=generator),
            torch.randint(-128, 128, (HUGE_PAGE_BYTES // 2 + 5,), dtype=torch.int8, generator=generator),
            torch.randn(3, 5, generator=generator).bfloat16()]


@offered
def test_gathered_tensors_keep_their_values_lie_one_after_another_each_with_its_own_storage(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    gathered = list(tensors)
    seen: list[tuple[int, torch.Tensor]] = []
    with torch.inference_mode():
        assert gather_in_huge_pages(gathered, lambda index, copy: seen.append((index, copy)))
    assert [index for index, _ in seen] == list(range(len(tensors)))
    assert all(copy is gathered[index] for index, copy in seen)
    assert len(gathered) == len(tensors) and not any(t.is_inference() for t in gathered)
    for before, after in zip(tensors, gathered, strict=True):
        assert after.dtype == before.dtype and after.shape == before.shape and torch.equal(after, before)
        assert after.data_ptr() != before.data_ptr() or not before.numel()
    present = [t for t in gathered if t.numel()]
    assert laid_one_after_another(gathered) and not laid_one_after_another(tensors)
    assert all(t.data_ptr() % GATHER_ALIGNMENT == 0 for t in present)
    assert present[0].data_ptr() % HUGE_PAGE_BYTES == 0 and advised_for_huge_pages(present[-1].data_ptr())
    # one storage each, over its own bytes: savers and tied-weight checks tell them apart
    assert [t.untyped_storage().nbytes() for t in present] == [t.nbytes for t in present]
    assert len({t.untyped_storage().data_ptr() for t in present}) == len(present)
    again = list(gathered)
    assert not gather_in_huge_pages(again) and all(a is b for a, b in zip(again, gathered, strict=True))
    gathered[1][0, 0] = 7  # writable; the others unchanged
    assert float(gathered[1][0, 0]) == 7 and torch.equal(gathered[0], tensors[0])
    from safetensors.torch import load_file, save_file
    save_file({str(i): t for i, t in enumerate(gathered)}, tmp_path / "gathered.safetensors")
    loaded = load_file(tmp_path / "gathered.safetensors")
    assert all(torch.equal(loaded[str(i)], t) for i, t in enumerate(gathered))


@pytest.mark.parametrize("case", ["below one huge page", "environment off"])
def test_gathering_leaves_the_tensors_as_they_are_when_it_would_not_help(case: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = mixed_tensors()
    if case == "environment off":
        monkeypatch.setenv("MIXPREC_HUGE_PAGES", "0")
    else:
        tensors = tensors[1:4]
    kept = list(tensors)
    assert not gather_in_huge_pages(kept) and all(after is before for after, before in zip(kept, tensors, strict=True))


@offered
def test_each_original_is_freed_before_the_next_is_copied() -> None:
    tensors = [torch.full((HUGE_PAGE_BYTES // 4,), float(index)) for index in range(3)]  # held by the list only
    originals = [weakref.ref(tensor) for tensor in tensors]
    alive_when_replaced = []
    assert gather_in_huge_pages(tensors, lambda index, copy: alive_when_replaced.append(
        [reference() is not None for reference in originals]))
    assert alive_when_replaced == [[False, True, True], [False, False, True], [False, False, False]]
    assert [float(tensor[-1]) for tensor in tensors] == [0.0, 1.0, 2.0]


def test_gathering_refuses_what_it_cannot_lay_out() -> None:
    with pytest.raises(ValueError, match="contiguous strided CPU tensors; tensor 1 is torch.strided on cpu, not "
                                         "contiguous"):
        gather_in_huge_pages([torch.zeros(4), torch.zeros(4, 4).t()])
    with pytest.raises(ValueError, match="tensor 0 is torch.sparse_coo on cpu"):
        gather_in_huge_pages([torch.zeros(4, 4).to_sparse()])
    with pytest.raises(ValueError, match="CPU tensors; item 0 is list"):
        gather_in_huge_pages([[1, 2]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="a list of tensors \\(its entries are replaced\\), got tuple"):
        gather_in_huge_pages((torch.zeros(4),))  # type: ignore[arg-type]


def test_zeros_in_huge_pages_follow_the_default_device_and_refuse_negative_sizes() -> None:
    with torch.device("meta"):
        assert zeros_in_huge_pages((4096, 4096), torch.int8).is_meta
    with pytest.raises(ValueError, match=r"needs sizes >= 0, got \(4, -1\)"):
        zeros_in_huge_pages((4, -1), torch.int8)


@offered
def test_written_memory_collapses_into_huge_pages_with_its_values(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(1)
    values = torch.randint(-128, 128, (3 * HUGE_PAGE_BYTES,), dtype=torch.int8, generator=generator)
    written = values.clone()
    collapsed = collapse_into_huge_pages(written.data_ptr(), written.nbytes)
    if collapsed == 0:
        pytest.skip("MADV_COLLAPSE made no huge page: a kernel before Linux 6.1, or (best effort) no free 2 MiB page "
                    "at this moment")
    assert collapsed >= 2 * HUGE_PAGE_BYTES  # every whole 2 MiB page inside the buffer
    assert int(mapping_fields(written.data_ptr() + HUGE_PAGE_BYTES)["AnonHugePages"][0]) > 0
    assert torch.equal(written, values)
    weight = values[: 4096 * 1024].view(4096, 1024)
    calls: list[tuple[int, int, int]] = []

    def recorded(address: int, nbytes: int) -> int:
        calls.append((address, nbytes, collapse_into_huge_pages(address, nbytes)))
        return calls[-1][2]

    monkeypatch.setattr(huge_pages, "collapse_into_huge_pages", recorded)
    packed = onednn_int8.prepack(weight)  # asks to collapse oneDNN's pack the same way
    address = torch.ops.mkldnn.data_ptr(packed)
    assert [call[:2] for call in calls] == [(address, torch.ops.mkldnn._nbytes(packed))]
    if calls[0][2] > 0:  # best effort: the kernel may find no free huge page at that moment (seen once, full suite)
        assert int(mapping_fields(address + HUGE_PAGE_BYTES)["AnonHugePages"][0]) > 0
    assert torch.equal(onednn_int8.unpack(packed), weight)


@pytest.mark.parametrize("switch", ["environment", "kernel says never"])
def test_huge_pages_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, switch: str) -> None:
    if switch == "environment":
        monkeypatch.setenv("MIXPREC_HUGE_PAGES", "0")
    else:
        monkeypatch.setattr(huge_pages, "transparent_huge_pages", lambda: "never")
    buffer = zeros_in_huge_pages((2 * HUGE_PAGE_BYTES,), torch.uint8)
    assert not from_own_mapping(buffer) and not buffer.any()
    assert collapse_into_huge_pages(buffer.data_ptr(), buffer.nbytes) == 0
    assert collapse_into_huge_pages(HUGE_PAGE_BYTES + 1, HUGE_PAGE_BYTES) == 0  # no whole huge page inside
    with pytest.raises(ValueError, match="byte count >= 0, got 4096, -1"):
        collapse_into_huge_pages(4096, -1)
