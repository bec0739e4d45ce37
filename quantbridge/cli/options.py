"""Options that more than one command takes, each declared once: its flags, parameter name, type and
check live here; what differs between commands (a default, a bound, the help in that command's words)
is passed by the command. Options only one command takes are declared with that command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]

SKIP_DEFAULT = r"(^|\.)lm_head$"


def int_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """A comma-separated list of positive integers (batch sizes): 0 or a negative value is refused here,
    before any work, rather than running as something else."""
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,16,128") from None
    if not out:
        raise click.BadParameter("give at least one value, e.g. 1,16")
    bad = [v for v in out if v < 1]
    if bad:
        raise click.BadParameter(f"{bad[0]} is not a positive integer; every value must be at least 1, e.g. 1,16,128")
    return out


# -- what runs ------------------------------------------------------------------------------------------


def backends(default: str | None, help: str) -> Decorator:
    """--backends: comma-separated backend names, checked by the registry when the command runs."""
    shown = {"show_default": True} if default is not None else {}
    return click.option("--backends", default=default, help=help, **shown)


def kernels(help: str) -> Decorator:
    """--kernels K1,K2 (parsed by plugin.kernel.parse_kernels when the command runs)."""
    return click.option("--kernels", "kernels_csv", default=None, metavar="K1,K2", help=help)


def batches(default: str, help: str) -> Decorator:
    """--batch M1,M2,...: the M values, each a positive integer."""
    return click.option("--batch", "batches", default=default, show_default=True, callback=int_list, help=help)


def isolation(help: str) -> Decorator:
    """--isolation process|none: rows (bench: backends) in child processes, or all in this one."""
    return click.option("--isolation", default="process", show_default=True, type=click.Choice(["process", "none"]),
                        help=help)


# -- the quantization ----------------------------------------------------------------------------------


def group_size(help: str) -> Decorator:
    """--group-size auto|32|64|128|-1 (parsed by plugin.spec.parse_group_size when the command runs)."""
    return click.option("--group-size", default="auto", show_default=True, help=help)


def symmetric(help: str | None = None) -> Decorator:
    """--symmetric/--asymmetric: the zero-point fixed at 8, or fitted per group."""
    return click.option("--symmetric/--asymmetric", default=False, show_default=True, help=help)


def act_order(help: str) -> Decorator:
    """--act-order: GPTQ's desc_act, g_idx in the weights."""
    return click.option("--act-order", is_flag=True, help=help)


def skip(help: str) -> Decorator:
    """--skip REGEX: layer paths kept in float (checked by run.preflight.check_skip when the command runs)."""
    return click.option("--skip", default=SKIP_DEFAULT, show_default=True, help=help)


# -- calibration (gptq, awq) ---------------------------------------------------------------------------


def calib_file(help: str) -> Decorator:
    """--calib FILE: calibration text."""
    return click.option("--calib", "calib_file", default=None, type=click.Path(dir_okay=False), help=help)


def calib_samples(help: str) -> Decorator:
    """--calib-samples N: calibration sequences (default by device: run.settings.calibration_size)."""
    return click.option("--calib-samples", default=None, type=click.IntRange(min=1), help=help)


def calib_len(help: str) -> Decorator:
    """--calib-len N: tokens per calibration sequence (default by device: run.settings.calibration_size)."""
    return click.option("--calib-len", default=None, type=click.IntRange(min=2), help=help)


def full_calibration(help: str) -> Decorator:
    """--full-calibration: the GPU's calibration size on any device."""
    return click.option("--full-calibration", is_flag=True, help=help)


# -- timing and where ----------------------------------------------------------------------------------


def runs(default: int, help: str, minimum: int | None = None) -> Decorator:
    """--runs N: timed runs (compare takes any integer and Settings checks it; bench has a floor)."""
    kind = int if minimum is None else click.IntRange(min=minimum)
    return click.option("--runs", default=default, show_default=True, type=kind, help=help)


def warmup(default: int, minimum: int, help: str) -> Decorator:
    """--warmup N: untimed runs first."""
    return click.option("--warmup", default=default, show_default=True, type=click.IntRange(min=minimum), help=help)


def device(help: str = "auto, cpu, cuda or cuda:N.") -> Decorator:
    """--device (resolved by measure.hardware.resolve_device when the command runs)."""
    return click.option("--device", default="auto", show_default=True, help=help)


def dtype(help: str) -> Decorator:
    """--dtype auto|bf16|fp16|fp32 (resolved by measure.hardware.resolve_dtype when the command runs)."""
    return click.option("--dtype", default="auto", show_default=True, help=help)


# -- output --------------------------------------------------------------------------------------------


def out_dir(default: str, help: str | None = None) -> Decorator:
    """--out DIR: a directory of result files."""
    return click.option("--out", "out_dir", default=default, show_default=True, type=click.Path(file_okay=False),
                        help=help)


def out_file(default: str | None, help: str | None = None) -> Decorator:
    """--out FILE: one result file."""
    shown = {"show_default": True} if default is not None else {}
    return click.option("--out", "out_file", default=default, type=click.Path(dir_okay=False), help=help, **shown)


def layers(help: str) -> Decorator:
    """--layers/--no-layers: the terminal's per-layer table with every layer, or none (default: a few)."""
    return click.option("--layers/--no-layers", "layers", default=None, help=help)
