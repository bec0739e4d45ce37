"""`quantbridge convert`: a model or INT4 checkpoint written as an INT4 checkpoint in another layout.

Modules that import torch are imported when the command runs, so `--help` and a refused option answer
without loading it.
"""

from __future__ import annotations

import click
from rich.console import Console

from quantbridge.cli import options
from quantbridge.files import faults
from quantbridge.files.cache import check_cache_dir
from quantbridge.models.textfile import TEXT_CHECK_BYTES, read_text_strict
from quantbridge.plugin.spec import QuantSpec, parse_group_size

EPILOG = """\b
Examples:
  quantbridge convert demo --to gptq runs/demo-gptq --method gptq      # calibrate GPTQ, write a GPTQ checkpoint
  quantbridge convert runs/demo-gptq --to awq runs/demo-awq            # lossless re-pack, no re-quantization
  quantbridge convert ./llama --to compressed-tensors ./llama-ct --method awq
  quantbridge compare runs/demo-awq --backends native,gptq             # a checkpoint's own weights, every kernel

\b
SRC is `demo`, a model directory or hub id (quantized with --method), or an INT4 checkpoint
in any supported layout (gptq, awq, compressed-tensors pack-quantized, native), which is
decoded and re-encoded bit-exactly. The checkpoint's config.json gets the target's
quantization_config. GPTQ is written as v1 when symmetric and as gptq_v2 when asymmetric
(what GPTQModel loads); AWQ and compressed-tensors hold no act-order. Which tools open
each: docs/backends.md, "What convert writes".
"""


@click.command(epilog=EPILOG)
@click.argument("src")
@click.option("--to", "to", required=True, type=click.Choice(["gptq", "awq", "compressed-tensors", "native"]),
              help="Layout of the written checkpoint.")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--method", default="native", show_default=True,
              help="For a float SRC: the algorithm that makes the weights (native = RTN, gptq, awq).")
@options.group_size(help="auto (the largest of 128, 64, 32 dividing every quantized layer), 32, 64, 128 or -1 "
                         "(per-channel).")
@options.symmetric()
@options.act_order(help="GPTQ act-order (g_idx); not for awq.")
@options.skip(help="Regex of linears kept in float.")
@options.calib_file(help="Calibration text for gptq/awq.")
@options.calib_samples(help="[default: 128 on a GPU, 16 on a CPU]")
@options.calib_len(help="[default: 512 on a GPU, 256 on a CPU]")
@options.full_calibration(help="128 x 512 calibration tokens on any device.")
@options.device(help="Where gptq/awq calibrate: auto, cpu, cuda.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def convert(src: str, to: str, out_dir: str, method: str, group_size: str, symmetric: bool, act_order: bool,
            skip: str, calib_file: str | None, calib_samples: int | None, calib_len: int | None, full_calibration: bool,
            device: str, overwrite: bool) -> None:
    """Write SRC as an INT4 checkpoint in another layout (lossless between INT4 layouts)."""
    from quantbridge.measure.hardware import resolve_device, resolve_dtype
    from quantbridge.models.checkpoint import check_out_dir
    from quantbridge.models.text import calibration
    from quantbridge.run.convert import convert as run
    from quantbridge.run.preflight import check_skip
    from quantbridge.run.settings import calibration_size

    check_skip(skip)
    if calib_file:  # a binary or non-UTF-8 file is refused before the model loads, as in compare
        read_text_strict(calib_file, "--calib", TEXT_CHECK_BYTES)
    _, replaced = check_out_dir(out_dir, overwrite)
    check_cache_dir()
    if replaced:
        click.echo(f"--overwrite: the checkpoint in {out_dir} will be replaced ({', '.join(replaced)})", err=True)
    spec = QuantSpec(group_size=parse_group_size(group_size), symmetric=symmetric, act_order=act_order)
    dev = resolve_device(device)
    samples, length, _ = calibration_size(calib_samples, calib_len, dev, full_calibration)
    try:
        with Console(stderr=True).status(f"converting {src} to {to}"):
            # Calibrate in fp32 on CPU and bf16 on GPU, as compare does.
            summary = run(src, to, out_dir, method=method, spec=spec, skip=skip, device=dev,
                          dtype=resolve_dtype("auto", dev), overwrite=overwrite,
                          calib_factory=lambda tok: calibration(tok, samples, length, calib_file))
    except KeyboardInterrupt as e:  # before the swap nothing of OUT_DIR was touched; during it, it finishes
        stop = faults.as_interrupted(e)
        stop.state = stop.state or (f"the previous checkpoint in {out_dir} is intact; nothing else was left behind"
                                    if replaced else f"nothing was written to {out_dir}")
        raise stop from None
    click.echo(f"wrote {summary['out']}: {summary['layers']} layers as {summary['format']}, {summary['how']}, "
               f"{summary['bytes'] / 1e6:.2f} MB")
