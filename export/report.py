"""Readable tables of an entry's artifacts: sizes, check figures and benchmark numbers."""

from __future__ import annotations

from imgcls.runtimes import DEFAULT_ORDER


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def artifact_table(artifacts: list[dict]) -> str:
    """One row per artifact; `artifacts` are `Artifact.model_dump()` dicts."""
    header = (f"{'artifact':<12} {'size':>9} {'accuracy':>8} {'top-1 agree':>11} {'max |dp|':>9} "
              f"{'b1 p50 ms':>9} {'b1 p90 ms':>9} {'b32 img/s':>9} {'threads':>7}")
    lines = [header, "-" * len(header)]
    for a in artifacts:
        c, b = a.get("checks", {}), a.get("benchmark", {})
        agree = "reference" if c.get("role") == "reference" else _num(c.get("top1_agreement"), ".2%")
        lines.append(
            f"{a['format']:<12} {_mb(a['size_bytes']):>9} {_num(a.get('accuracy'), '.2%'):>8} {agree:>11} "
            f"{_num(c.get('max_abs_prob_diff'), '.2g'):>9} {_num(b.get('batch1_p50_ms'), '.2f'):>9} "
            f"{_num(b.get('batch1_p90_ms'), '.2f'):>9} {_num(b.get('batch32_images_per_s'), '.1f'):>9} "
            f"{_num(b.get('threads'), 'd'):>7}"
        )
    return "\n".join(lines)


def fastest(artifacts: list[dict], formats: tuple[str, ...] = ("onnx", "tflite", "savedmodel")) -> str | None:
    """The full-precision format with the highest batch-32 throughput (what the server defaults to)."""
    timed = [a for a in artifacts if a["format"] in formats and a.get("benchmark", {}).get("batch32_images_per_s")]
    return max(timed, key=lambda a: a["benchmark"]["batch32_images_per_s"])["format"] if timed else None


def default_runtime(artifacts: list[dict]) -> str | None:
    """The format `imgcls serve` runs by default: the first of `DEFAULT_ORDER` present (a fixed order, not
    the benchmark above, which moves with the machine's load)."""
    present = {a["format"] for a in artifacts}
    return next((f for f in DEFAULT_ORDER if f in present), None)
