"""Checks that an exported TVM library carries compiled device code for every GPU kernel.

An exported ``.so`` for ``cuda``/``rocm`` embeds the device module: a CUDA fatbin holding an
ELF cubin (``EM_CUDA``), or an AMDGPU code object (``EM_AMDGPU``). This module finds those ELF
images in the library bytes, reads their function symbols, and compares them with the kernel
names of the generated device source. Pure Python; needs no GPU and no TVM.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

EM_CUDA = 190
EM_AMDGPU = 224
MACHINES = {EM_CUDA: "cuda", EM_AMDGPU: "amdgpu"}
STT_FUNC = 2


@dataclass
class DeviceImage:
    """One embedded device ELF."""

    machine: str
    flags: int
    offset: int
    size: int
    functions: set[str] = field(default_factory=set)


def _cstr(data: bytes, start: int) -> str:
    end = data.find(b"\0", start)
    return data[start:end].decode("ascii", errors="replace")


def _parse_elf(data: bytes, base: int) -> DeviceImage | None:
    """Parse the little-endian ELF64 image at ``base`` (None if it is not a device ELF)."""
    if data[base + 4] != 2 or data[base + 5] != 1:  # ELFCLASS64, little endian
        return None
    machine, = struct.unpack_from("<H", data, base + 18)
    if machine not in MACHINES:
        return None
    shoff, = struct.unpack_from("<Q", data, base + 40)
    flags, = struct.unpack_from("<I", data, base + 48)
    shentsize, shnum = struct.unpack_from("<HH", data, base + 58)
    sections = []
    for i in range(shnum):
        off = base + shoff + i * shentsize
        _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, off)
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_entsize))
    size = shoff + shnum * shentsize
    for sh_type, sh_offset, sh_size, _, _ in sections:
        size = max(size, sh_offset + sh_size if sh_type != 8 else 0)  # SHT_NOBITS has no file bytes
    image = DeviceImage(MACHINES[machine], flags, base, size)
    for sh_type, sh_offset, sh_size, sh_link, sh_entsize in sections:
        if sh_type != 2 or not sh_entsize:  # SHT_SYMTAB
            continue
        strtab_offset = sections[sh_link][1]
        for j in range(sh_size // sh_entsize):
            st_name, st_info = struct.unpack_from("<IB", data, base + sh_offset + j * sh_entsize)
            if st_info & 0xF == STT_FUNC:
                image.functions.add(_cstr(data, base + strtab_offset + st_name))
    return image


def device_images(library: Path | bytes) -> list[DeviceImage]:
    """Every CUDA or AMDGPU ELF embedded in ``library`` (a path or its bytes)."""
    data = library if isinstance(library, bytes) else Path(library).read_bytes()
    images = []
    start = 1  # offset 0 is the host library itself
    while (pos := data.find(b"\x7fELF", start)) >= 0:
        try:
            image = _parse_elf(data, pos)
        except (struct.error, IndexError):
            image = None
        if image is not None:
            images.append(image)
            start = pos + max(image.size, 4)
        else:
            start = pos + 4
    return images


_CUDA_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')
_AMDGPU_KERNEL = re.compile(r"^define (?:[a-z_]+ )*amdgpu_kernel void @\"?(\w+)\"?\(", re.MULTILINE)


def kernel_names(source: str, kind: str) -> list[str]:
    """Kernel entry points declared in generated CUDA C (``cuda``) or AMDGPU LLVM IR (``rocm``)."""
    pattern = _CUDA_KERNEL if kind == "cuda" else _AMDGPU_KERNEL
    return sorted(set(pattern.findall(source)))


def amdgpu_mach(flags: int) -> int:
    """The ``EF_AMDGPU_MACH`` value of an AMDGPU ELF (gfx942 is 0x4c, gfx90a is 0x3f)."""
    return flags & 0xFF


def cuda_sm(flags: int) -> int:
    """The SM version a CUDA ELF was compiled for (e.g. 90)."""
    return (flags >> 8) & 0xFF
