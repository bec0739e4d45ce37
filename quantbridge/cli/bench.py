"""`quantbridge bench`: every backend's INT4 linear timed on model shapes against the memory roof.

Modules that import torch are imported when the command runs, so `--help` and a refused option answer
without loading it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantbridge.cli import options
from quantbridge.cli.outpaths import check_writable_dir
from quantbridge.cli.output import exit_if_rows_failed
from quantbridge.files import faults
from quantbridge.files.cache import check_cache_dir
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.files import write_atomic
from quantbridge.plugin.spec import QuantSpec, parse_group_size
from quantbridge.report.bench import roofline_png, to_markdown

EPILOG = """\b
Examples:
  quantbridge bench --quick                                   # CPU smoke run: reference kernel, fp32 matmul
  quantbridge bench --shapes llama3-8b --batch 1,16,128       # on a GPU
  quantbridge bench --shapes llama3-8b,llama3-70b --backends native,tinygemm,bnb-nf4,bnb-fp4
  quantbridge bench --dtype fp16 --backends native --kernels exllamav2,gemlite,autoawq   # engine kernels

\b
Writes OUT/bench.json (device, driver, clocks, versions, every row), OUT/bench.md and,
with matplotlib installed, OUT/roofline.png.

\b
Exit status: 0 every requested row measured; 1 the results were written but a row failed or
was incorrect, or a backend or kernel named with --backends/--kernels was unavailable here
(each named on stderr with its fix; unavailable backends of the default --backends list do
not count); 2 bad input.
"""

@click.command(epilog=EPILOG)
@click.option("--shapes", default="llama3-8b", show_default=True,
              help="Shape sets (llama3-8b, llama3-70b, quick) and/or KxN pairs, comma-separated.")
@options.batches("1,2,4,8,16,32,64,128,512,4096", help="M values: tokens per call.")
@options.backends("fp16,native,tinygemm,bnb-nf4,bnb-fp4",
                  help="Backends to time; fp16 (cuBLAS/torch in the compute dtype) always runs as the baseline.")
@options.kernels(help="Kernels to time on their own, each a row rtn+K: round-to-nearest codes through exactly that "
                      "kernel (GPTQ/AWQ engine kernels without calibrating; see `quantbridge env`).")
@options.group_size(help="INT4 group size: auto (the largest of 128, 64, 32 dividing every shape), 32, 64, 128 or -1.")
@options.runs(50, minimum=5, help="Timed runs per row.")
@options.warmup(5, minimum=1, help="Untimed runs first.")
@options.device()
@options.dtype(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")
@click.option("--quick", is_flag=True, help="Small shapes, M=1,16, 10 runs: a smoke test that runs anywhere.")
@options.out_dir("runs/bench")
@options.isolation(help="process: each backend runs in its own child process, so one that kills its process fails "
                        "only its rows; none: everything in this process.")
def bench(shapes: str, batches: list[int], backends: str, kernels_csv: str | None, group_size: str, runs: int,
          warmup: int, device: str, dtype: str, quick: bool, out_dir: str, isolation: str) -> None:
    """Time every backend's INT4 linear on real model shapes against the measured memory roof."""
    from quantbridge.measure.hardware import resolve_device, resolve_dtype
    from quantbridge.plugin import backend as registry
    from quantbridge.plugin.kernel import parse_kernels, refuse_dtype
    from quantbridge.run.bench import SHAPE_SETS, parse_shapes, run_bench

    if quick:
        shapes, batches, runs, warmup = ",".join(f"{k}x{n}" for k, n in SHAPE_SETS["quick"]), [1, 16], 10, 2
    dev = resolve_device(device)
    # What was asked is checked before anything is created: then the paths it writes.
    shape_list, names = parse_shapes(shapes), registry.parse_names(backends)
    spec = QuantSpec(group_size=parse_group_size(group_size))
    kernels = parse_kernels(kernels_csv) if kernels_csv else []
    dt = resolve_dtype(dtype, dev)
    refuse_dtype(kernels, dt, dev)
    check_cache_dir()
    out = check_writable_dir(out_dir, "--out", "runs/bench")  # every output path, before the first shape
    _check_bench_files(out)
    if isolation == "process":
        faults.check_tmpdir()
    measured = []  # rows in bench.json so far

    def write(name: str, data: str | bytes) -> None:
        try:
            write_atomic(out / name, data)
        except OSError as e:
            raise faults.WriteFailed(out / name, e) from None

    def save(partial: dict) -> None:  # after every shape, so a cut-off run keeps what it measured
        write("bench.json", json.dumps({**partial, "complete": False}, indent=1) + "\n")
        measured[:] = partial["rows"]
        faults.stage("bench-saved")  # test hook: a signal once rows are on disk

    try:
        res = run_bench(shape_list, batches, names, dev, dt, spec, runs=runs, warmup=warmup,
                        progress=lambda msg: click.echo(f"  {msg}", err=True), on_shape=save, isolation=isolation,
                        kernels=kernels)
    except KeyboardInterrupt as e:
        stop = faults.as_interrupted(e)
        stop.state = (f"{out / 'bench.json'} holds the {len(measured)} rows measured so far" if measured
                      else f"no row had been measured; nothing was written to {out}")
        raise stop from None
    res["complete"] = True
    write("bench.json", json.dumps(res, indent=1) + "\n")
    md = to_markdown(res)
    write("bench.md", md)
    click.echo(md)
    try:
        write("roofline.png", roofline_png(res))  # atomic, as every result file
        click.echo(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'roofline.png'}")
    except ImportError:
        click.echo(f"wrote {out / 'bench.json'}, {out / 'bench.md'} (no plot: pip install matplotlib)")
    _exit_if_rows_failed(res, backends, kernels_csv)


def _exit_if_rows_failed(res: dict, backends: str, kernels_csv: str | None) -> None:
    """Exit EXIT_ROWS_FAILED (the results are written) when a requested row did not measure: one line each.

    Unavailable rows count only for backends named with --backends and kernels named with
    --kernels: the default list holds backends that cannot run on every machine."""
    from quantbridge.plugin import backend as registry
    from quantbridge.plugin.kernel import parse_kernels
    from quantbridge.plugin.quantizer import baseline_label
    from quantbridge.run.bench import failures

    explicit = click.get_current_context().get_parameter_source("backends") == click.core.ParameterSource.COMMANDLINE
    named = set(registry.parse_names(backends)) if explicit else set()
    named |= {f"{baseline_label() or 'rtn'}+{k}" for k in (parse_kernels(kernels_csv) if kernels_csv else [])}
    exit_if_rows_failed(failures(res, named))


def _check_bench_files(out: Path) -> None:
    """bench replaces bench.json, bench.md and roofline.png in --out: only when an earlier bench wrote them."""
    present = [n for n in ("bench.json", "bench.md", "roofline.png") if (out / n).exists() or (out / n).is_symlink()]
    if not present:
        return
    try:
        data = json.loads((out / "bench.json").read_text(encoding="utf-8"))
        ours = isinstance(data, dict) and {"rows", "copy_bandwidth"} <= data.keys()
    except (OSError, ValueError):
        ours = False
    if not ours or any(not (out / n).is_file() or (out / n).is_symlink() for n in present):
        raise UserError(f"--out {out} holds {', '.join(present)}, which quantbridge bench did not write and would "
                        f"replace; move them away or choose another --out")
