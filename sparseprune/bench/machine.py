"""Which machine a result came from: the CPU (or GPU), its last-level cache, load, versions.

Every results file of the benchmarks carries :func:`run_metadata` (as CSV columns on each row and
as a JSON file beside the CSV), and lands in ``benchmarks/results/<label>/`` where the label comes
from :func:`results_label`: ``cpu-epyc-zen3-2core``, ``cpu-xeon-emr-2core`` (vendor, product line,
micro-architecture from family/model, CPUs available), ``cuda-nvidia-h100-80gb-hbm3``. Figures from
different machines thus never mix, and a reader can tell a Zen 3 figure from an Emerald Rapids one.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass

import torch

from .._device import cpuinfo_blocks, device_name


@dataclass(frozen=True)
class CpuId:
    vendor: str  # /proc/cpuinfo vendor_id: "AuthenticAMD", "GenuineIntel"; "" when unknown
    model_name: str
    family: int | None
    model: int | None
    stepping: int | None
    flags: frozenset


def cpu_id(path: str = "/proc/cpuinfo") -> CpuId:
    blocks = cpuinfo_blocks(path)
    b = blocks[0] if blocks else {}

    def num(key):
        try:
            return int(b[key], 0) if key in b else None
        except ValueError:
            return None

    return CpuId(vendor=b.get("vendor_id", ""), model_name=b.get("model name", platform.processor() or ""),
                 family=num("cpu family"), model=num("model"), stepping=num("stepping"),
                 flags=frozenset(b.get("flags", "").split()))


# (family, first model, last model, name). AMD: Zen 3 / Zen 4 share family 25 (0x19) and differ in
# model ranges; Zen 5 is family 26. Sources: the kernel's arch/x86 model tables and AMD's PPRs.
_AMD = [
    (23, 0x00, 0x2F, "zen"), (23, 0x30, 0xFF, "zen2"),
    (25, 0x00, 0x0F, "zen3"), (25, 0x10, 0x1F, "zen4"), (25, 0x20, 0x5F, "zen3"),
    (25, 0x60, 0x7F, "zen4"), (25, 0xA0, 0xAF, "zen4c"),
    (26, 0x00, 0x4F, "zen5"), (26, 0x60, 0x7F, "zen5"),
]
# Intel family 6 server (and a few client) models; Skylake-SP / Cascade / Cooper Lake share model 85
# and differ by stepping.
_INTEL = {63: "hsx", 79: "bdx", 106: "icx", 108: "icx", 143: "spr", 207: "emr", 173: "gnr", 174: "gnr",
          175: "srf", 221: "cwf", 151: "adl", 154: "adl", 183: "rpl", 186: "rpl", 191: "rpl", 170: "mtl",
          198: "arl", 189: "lnl", 140: "tgl", 141: "tgl"}


def uarch(cpu: CpuId) -> str | None:
    """Micro-architecture short name from vendor/family/model, or None when not in the tables."""
    if cpu.family is None or cpu.model is None:
        return None
    if cpu.vendor == "AuthenticAMD":
        for fam, lo, hi, name in _AMD:
            if cpu.family == fam and lo <= cpu.model <= hi:
                return name
    elif cpu.vendor == "GenuineIntel" and cpu.family == 6:
        if cpu.model == 85:
            s = cpu.stepping or 0
            return "skx" if s <= 4 else "clx" if s <= 7 else "cpx"
        return _INTEL.get(cpu.model)
    return None


def _product(cpu: CpuId) -> str:
    name = cpu.model_name.lower()
    for word in ("epyc", "ryzen", "threadripper", "xeon", "core"):
        if word in name:
            return word
    if cpu.vendor == "AuthenticAMD":
        return "amd"
    if cpu.vendor == "GenuineIntel":
        return "intel"
    return platform.machine().lower() or "cpu"


def cpus_available() -> int:
    """Logical CPUs this process may run on (the VM's vCPUs, or the affinity mask's size)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int | None:
    """Distinct (socket, core) pairs in /proc/cpuinfo; None where it does not say."""
    pairs = {(b.get("physical id"), b.get("core id")) for b in cpuinfo_blocks() if "core id" in b}
    return len(pairs) or None


def cpu_label(cpu: CpuId | None = None, cpus: int | None = None) -> str:
    """``cpu-<product>-<uarch>-<N>core``; an unknown family/model gives ``<product>-f<family>m<model>``."""
    cpu = cpu or cpu_id()
    cpus = cpus or cpus_available()
    arch = uarch(cpu)
    if arch is None and cpu.family is not None and cpu.model is not None:
        arch = f"f{cpu.family}m{cpu.model}"
    parts = ["cpu", _product(cpu)] + ([arch] if arch else []) + [f"{cpus}core"]
    return "-".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def results_label(device="cpu") -> str:
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_label()
    return f"{device.type}-{_slug(device_name(device))}"


def default_results_dir(device="cpu", root: str = os.path.join("benchmarks", "results")) -> str:
    return os.path.join(root, results_label(device))


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.I)
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]


def llc_from_sysfs(root: str = "/sys/devices/system/cpu") -> tuple[int, int] | None:
    """(level, bytes) of the last-level cache summed over its distinct instances, from sysfs."""
    best: dict[int, dict[str, int]] = {}  # level -> {instance (shared CPU list): size}
    for d in glob.glob(os.path.join(root, "cpu[0-9]*", "cache", "index[0-9]*")):
        try:
            with open(os.path.join(d, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "size")) as f:
                size = _size_bytes(f.read())
            with open(os.path.join(d, "shared_cpu_list")) as f:
                inst = f.read().strip()
        except (OSError, ValueError):
            continue
        best.setdefault(level, {})[inst] = size
    if not best:
        return None
    level = max(best)
    return level, sum(best[level].values())


def llc_from_lscpu() -> tuple[int, int] | None:
    try:
        out = subprocess.run(["lscpu", "-J", "-C", "--bytes"], capture_output=True, text=True, timeout=10).stdout
        caches = [c for c in json.loads(out)["caches"] if c.get("type") != "Instruction"]
        top = max(caches, key=lambda c: int(c["level"]))
        return int(top["level"]), int(top["all-size"])
    except (OSError, ValueError, KeyError, subprocess.SubprocessError):
        return None


ASSUMED_LLC_BYTES = 256 << 20  # where neither sysfs nor lscpu says: larger than most servers' L3 per VM


def llc_bytes(device="cpu") -> tuple[int, str]:
    """(bytes, where the figure came from) of the device's last-level cache (GPU: its L2)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size), "cuda L2"
    for source, fn in (("sysfs", llc_from_sysfs), ("lscpu", llc_from_lscpu)):
        found = fn()
        if found and found[1] > 0:
            return found[1], f"{source} L{found[0]}"
    return ASSUMED_LLC_BYTES, "assumed (sysfs and lscpu silent)"


# CPU flags that decide which kernels run (x86 names as /proc/cpuinfo spells them).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8")


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode:
            return ""
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def loadavg() -> tuple[float, float, float]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except (AttributeError, OSError):
        return (float("nan"),) * 3  # type: ignore[return-value]


def run_metadata(device="cpu", **extra) -> dict:
    """Flat {column: value} describing the machine and software for one benchmark run.

    Call it when the run starts (it records the load average then); :func:`finish` adds the load
    average at the end. ``extra`` (dtype, weights="hot"/"cold", ...) is appended as given.
    """
    from .. import __version__, build_info

    device = torch.device(device)
    cpu = cpu_id()
    info = build_info()
    llc, llc_src = llc_bytes(device)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "label": results_label(device),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu.model_name,
        "cpu_vendor": cpu.vendor,
        "cpu_family": cpu.family,
        "cpu_model_id": cpu.model,
        "cpu_stepping": cpu.stepping,
        "cpu_uarch": uarch(cpu) or "",
        "cpu_flags": " ".join(f for f in SIMD_FLAGS if f in cpu.flags),
        "isa": info["cpu_isa_active"],
        "isa_forced": os.environ.get("SPARSEPRUNE_CPU_ISA", ""),
        "cores": physical_cores(),
        "cpus": cpus_available(),
        "threads": torch.get_num_threads(),
        "llc_bytes": llc,
        "llc_source": llc_src,
        "loadavg_before": loadavg()[0],
        "loadavg_after": None,
        "torch": torch.__version__,
        "sparseprune": __version__,
        "git": _git_commit(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    meta.update(extra)
    return meta


def finish(meta: dict) -> dict:
    """The same metadata with the load average at the end of the run filled in."""
    return {**meta, "loadavg_after": loadavg()[0]}


def describe(meta: dict) -> str:
    """One line naming the machine, for the top of tables and logs."""
    fam = f"family {meta['cpu_family']} model {meta['cpu_model_id']}" if meta.get("cpu_family") is not None else ""
    what = meta["device_name"] if meta["device"] != "cpu" else f"{meta['cpu_model']} ({fam}, {meta['cpu_uarch'] or '?'})"
    load = f"load {meta['loadavg_before']}" + (f" -> {meta['loadavg_after']}" if meta.get("loadavg_after") is not None else "")
    return (f"{what} | isa {meta['isa']} | {meta['cores']} cores, {meta['cpus']} cpus, {meta['threads']} threads | "
            f"LLC {meta['llc_bytes'] / 2**20:.0f} MiB ({meta['llc_source']}) | {load} | torch {meta['torch']} | "
            f"sparseprune {meta['sparseprune']} {meta['git']} | {meta['date']}")


def caption(row: dict) -> str:
    """The machine and software of a results row, for the title of a plot."""
    return (f"{row['device_name']} ({row['label']}, isa {row['isa']}, {row['threads']} threads, {row['dtype']}, "
            f"torch {row['torch']})")


def write_metadata(path: str, meta: dict, **more) -> None:
    """Writes the run's metadata (plus anything in ``more``, e.g. the grid that was run) as JSON."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, **more}, f, indent=1, default=str)
        f.write("\n")
