"""Console scripts; each command is its own Typer app, named in ``[project.scripts]``.

User errors (``ValueError``, including ``ConfigError``, and ``OSError`` such as a read-only
``--out``) become one line on stderr and exit code 1; Ctrl-C during psc-search exits 130 with one line
saying how to resume (docs/reliability.md lists every case).
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from psc_nas.costs import format_count
from psc_nas.memory import keep_freed_memory
from psc_nas.threads import sleep_when_waiting

if TYPE_CHECKING:  # imported where used: psc-search shows its first line before PyTorch loads (seconds)
    from psc_nas.space import SearchSpace
    from psc_nas.tasks import Task

space_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def fail(command: str, err: Exception) -> typer.Exit:
    typer.echo(f"{command}: {one_line(err)}", err=True)
    return typer.Exit(1)


def prepare_process(command: str) -> None:
    """First thing a training command does, before torch loads: on a busy machine idle OpenMP threads sleep instead
    of spinning (``psc_nas.threads``), and freed memory stays in the process (``psc_nas.memory``)."""
    try:
        sleep_when_waiting()
    except ValueError as err:  # a bad $PSC_NAS_BUSY_LOAD
        raise fail(command, err) from None
    keep_freed_memory()  # training churns big tensors: keep freed memory, no page-fault storm


def one_line(err: Exception) -> str:
    """The error as one line: an OSError as ``path: reason`` (no errno), anything else as its first line."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}" + (f" ({err.filename2})" if err.filename2 else "")
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def path_option(text: str | None, option: str) -> str | None:
    """A folder option's value; None when not given. An empty value is an error, not "the current folder"."""
    if text is not None and not text.strip():
        raise ValueError(f"{option} is empty; leave it out to use the default")
    return text


def count_option(text: str | None, option: str) -> int | None:
    """A count option's value; None when not given. An empty value is an error, not "no budget"."""
    if text is None:
        return None
    from psc_nas.costs import parse_count

    try:
        return parse_count(text)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None


PORTS = range(65536)


def format_size(size: int) -> str:
    """Exact below a million, scientific above (space sizes reach 1e+45)."""
    return str(size) if size < 10**6 else f"{size:.2e}"


@space_app.command()
def space(
    name_or_path: Annotated[
        Optional[str],
        typer.Argument(metavar="[NAME|PATH]", help="A shipped space name or a space YAML; all if omitted."),
    ] = None,
) -> None:
    """Show search spaces: task, backbone, slots, number of distinct architectures, and the presets' cost
    at the task's input shape."""
    from psc_nas.space import SearchSpace, shipped_spaces
    from psc_nas.tasks import task_names

    try:
        spaces = [SearchSpace.load(name) for name in ([name_or_path] if name_or_path else shipped_spaces())]
        installed = task_names()  # imports plugins, which may fail
    except ValueError as err:
        raise fail("psc-space", err) from None
    tasks = [task_for(item, installed) for item in spaces]
    if name_or_path and isinstance(tasks[0], Exception):
        raise fail("psc-space", tasks[0])
    console = Console()
    overview = Table("space", "task", "input", "backbone", "slots", "decisions", "size", title="search spaces")
    for item, task in zip(spaces, tasks):
        overview.add_row(
            item.name,
            item.task,
            "-" if isinstance(task, Exception) else task.describe_input(),
            item.hparams["module"].rpartition(".")[2] if item.backbone == "module" else item.backbone,  # BYO network
            str(len(item.slots)),
            str(len(item.units)),
            format_size(item.size()),
        )
    console.print(overview)
    for item, task in zip(spaces, tasks):
        if name_or_path:
            console.print(decisions_table(item))
        if isinstance(task, Exception):
            console.print(f"{item.name}: presets not priced: {task}", highlight=False)
        else:
            console.print(presets_table(item, task))


def task_for(space: SearchSpace, installed: list[str]) -> Task | ValueError:
    """The installed task ``space`` is for, checked against the space, or the error saying why not."""
    from psc_nas.tasks import get_task

    if space.task not in installed:
        return ValueError(f"{space.source}: task {space.task!r} is not installed (installed: {', '.join(installed)})")
    try:
        task = get_task(space.task)
        task.check_space(space)
    except ValueError as err:
        return err
    return task


def decisions_table(space: SearchSpace) -> Table:
    table = Table("decision", "slots", "ops", "choices", title=f"{space.name}: decisions ({space.source})")
    for unit, count in zip(space.units, space.option_counts):
        names = [space.slots[i].name for i in unit.slots]
        shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
        table.add_row(unit.label, shown, ", ".join(unit.domains), str(count))
    return table


def presets_table(space: SearchSpace, task: Task) -> Table:
    from psc_nas.nets import cost

    table = Table("preset", "params", "MACs", title=f"{space.name} at {task.describe_input()}")
    for name, config in space.presets().items():
        price = cost(config, task.input_shape)
        table.add_row(name, format_count(price.params), format_count(price.macs))
    return table


READ_STORAGE_HELP = (
    "Where psc-search --storage put the study: a database URL (sqlite:///..., postgresql://...) or journal:PATH; "
    "default RUN_DIR/study.db."
)
READ_STUDY_HELP = "Study name in --storage; default RUN_DIR's folder name, as psc-search names it."

export_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@export_app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="A search run folder, e.g. runs/ibsr-5M.")],
    pick: Annotated[str, typer.Option(help="knee | best | 'trial N' | 'under 2M' | 'under 50G macs'.")] = "knee",
    fmt: Annotated[str, typer.Option("--format", help="Config format: yaml or json.")] = "yaml",
    out: Annotated[Optional[str], typer.Option(help="Output folder; default RUN_DIR/export.")] = None,
    retrain: Annotated[
        bool, typer.Option(help="Train the pick from scratch at full fidelity and save its weights.")
    ] = False,
    epochs: Annotated[
        Optional[int], typer.Option(help="Epochs for --retrain; default the run's longest learning curve.")
    ] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="Task data for --retrain; default the task's own.")] = None,
    torchscript: Annotated[bool, typer.Option(help="Also write a traced TorchScript module.")] = False,
    onnx: Annotated[bool, typer.Option(help="Also write an ONNX model (needs pip install 'psc-nas\\[onnx]').")] = False,
    storage: Annotated[Optional[str], typer.Option(help=READ_STORAGE_HELP)] = None,
    study_name: Annotated[Optional[str], typer.Option(help=READ_STUDY_HELP)] = None,
    allow_untrained: Annotated[
        bool, typer.Option(help="Let --torchscript/--onnx write a pick without trained weights (random ones).")
    ] = False,
) -> None:
    """Write the architecture picked from a search run with its trained weights where the search kept any:
    psc_nas.load_model(config) rebuilds the trained network, psc_nas.build_model(config) an untrained one."""
    prepare_process("psc-export")
    from psc_nas.export import Pick
    from psc_nas.export import export as export_run

    try:
        done = export_run(
            run_dir,
            pick,
            fmt=fmt,
            out_dir=out,
            retrain=retrain,
            epochs=epochs,
            data_dir=data_dir,
            torchscript=torchscript,
            onnx=onnx,
            storage=storage,
            study_name=study_name,
            allow_untrained=allow_untrained,
        )
    except (ValueError, OSError) as err:
        raise fail("psc-export", err) from None
    record = done.record
    quality = ", ".join(f"{k} {v:.4f}" for k, v in record.metrics.items() if isinstance(v, float))
    typer.echo(
        f"trial {record.number} ({Pick.parse(pick)}): {format_count(record.params)} params, "
        f"{format_count(record.macs)} MACs"
        + (f", {quality}" if quality else "")
        + (f" (search: {record.fidelity.words})" if quality and record.fidelity else "")
    )
    for kind, path in done.files.items():
        typer.echo(f"  {kind}: {path}")
    if done.weights:
        typer.echo(f"  trained: {done.weights}")
    else:
        typer.echo("  no trained weights: build_model(config) gives an untrained network; --retrain trains one")
    for warning in done.warnings:
        typer.echo(warning, err=True)


dashboard_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dashboard_app.command()
def dashboard(
    run_dir: Annotated[str, typer.Argument(help="A search run folder, running or finished.")],
    port: Annotated[int, typer.Option(help="Port to serve on (0: any free port).")] = 8050,
    host: Annotated[
        str, typer.Option(help="Interface to bind; anything but 127.0.0.1 exposes the run to the network.")
    ] = "127.0.0.1",
    snapshot: Annotated[bool, typer.Option(help="Only write RUN_DIR/dashboard.html (works offline) and exit.")] = False,
    storage: Annotated[Optional[str], typer.Option(help=READ_STORAGE_HELP)] = None,
    study_name: Annotated[Optional[str], typer.Option(help=READ_STUDY_HELP)] = None,
) -> None:
    """Serve a live dashboard of a search run: Pareto fronts, architectures, curves, trial table."""
    from psc_nas.dashboard import LOOPBACK_NAMES, make_server, write_snapshot

    try:
        if port not in PORTS:
            raise ValueError(f"--port must be between 0 and 65535, got {port}")
        if snapshot:
            typer.echo(f"wrote {write_snapshot(run_dir, storage=storage, study_name=study_name)}")
            return
        server = make_server(run_dir, host=host, port=port, storage=storage, study_name=study_name)
    except (ValueError, OSError, OverflowError) as err:
        raise fail("psc-dashboard", err) from None
    if host not in LOOPBACK_NAMES:
        typer.echo(
            f"psc-dashboard: warning: listening on {host}:{server.server_address[1]}: anyone who can reach this "
            f"machine on that port can read run {run_dir} (its trials, architectures and folder path); "
            "there is no password",
            err=True,
        )
    # SIGINT stops the server even where the shell started it ignoring SIGINT (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # from here on Ctrl-C is how the server stops: exit 0
        typer.echo(f"serving {run_dir} at {server.url} (Ctrl-C to stop)")
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


search_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@search_app.command()
def search(
    task: Annotated[str, typer.Option(help="Task to search for (e.g. ibsr).")] = "ibsr",
    budget: Annotated[Optional[str], typer.Option(help="Parameter budget, e.g. 5M, 1.4M, 250k.")] = None,
    macs_budget: Annotated[Optional[str], typer.Option(help="MAC budget at the task's input size, e.g. 60G.")] = None,
    objectives: Annotated[
        str, typer.Option(help="Comma list: metric plus any of params, macs, latency.")
    ] = "metric,params",
    trials: Annotated[
        Optional[int],
        typer.Option(help="Architectures to train in total (the study's, over all workers); default from --profile."),
    ] = None,
    timeout: Annotated[
        Optional[str],
        typer.Option(
            help="Start no training after this long, e.g. 900, 15m, 2h; with retraining the search loop stops the "
            "profile's retrain share earlier (quick: 30%) and retraining fits the rest."
        ),
    ] = None,
    sampler: Annotated[str, typer.Option(help="nsga2 | tpe | random (--engine optuna).")] = "nsga2",
    engine: Annotated[
        str,
        typer.Option(
            help="optuna | nni (NNI's strategies propose; pip install 'psc-nas\\[nni]') | cakes (the CAKES paper's "
            "super-network search: one training per priority, the found allocations retrained; --engine-option)."
        ),
    ] = "optuna",
    strategy: Annotated[
        str,
        typer.Option(
            help="--engine nni: evolution | random | tpe (multi-trial), or spos | darts | proxyless (NNI's one-shot "
            "RandomOneShot, DARTS, Proxyless on a super-net of LayerChoices: at most 3 decisions per op and unit, "
            "evenly spaced by params; the found architecture retrained; --engine-option)."
        ),
    ] = "evolution",
    storage: Annotated[
        Optional[str],
        typer.Option(help="Study storage: a database URL (postgresql://...) or journal:PATH; default OUT/study.db."),
    ] = None,
    study_name: Annotated[Optional[str], typer.Option(help="Study name; default the --out folder's name.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and of every training.")] = 0,
    profile: Annotated[str, typer.Option(help="quick (CPU, minutes) | paper (GPU, the paper's training).")] = "quick",
    data_dir: Annotated[Optional[str], typer.Option(help="Task data; default the task's own.")] = None,
    out: Annotated[
        Optional[str], typer.Option(help="Run folder; default runs/<task>-<budget>. Re-run to resume.")
    ] = None,
    space: Annotated[Optional[str], typer.Option(help="Search space name or YAML; default <task>_<backbone>.")] = None,
    multi_fidelity: Annotated[bool, typer.Option(help="Train short first, promote only front candidates.")] = True,
    seed_presets: Annotated[bool, typer.Option(help="Evaluate the papers' presets that fit the budget first.")] = True,
    evaluator: Annotated[
        Optional[str], typer.Option(help="How candidates are scored: train | supernet; default the profile's.")
    ] = None,
    evaluator_option: Annotated[
        Optional[list[str]], typer.Option(help="KEY=VALUE for the evaluator (repeatable), e.g. width=0.25.")
    ] = None,
    retrain: Annotated[
        Optional[bool],
        typer.Option(
            "--retrain/--no-retrain",
            help="After the search, retrain the front's knee and its neighbours from scratch for the longest schedule "
            "that fits the time budget (its last share; the profile's policy); best.yaml = the retrained knee. "
            "Default: as the profile says (quick and paper retrain).",
        ),
    ] = None,
    budget_sampling: Annotated[
        str,
        typer.Option(
            help="restrict (sample only what can fit) | project (shrink to fit) | reject (prune over-budget samples); "
            "--engine nni always rejects."
        ),
    ] = "restrict",
    prescreen: Annotated[
        Optional[str],
        typer.Option(
            help="Before any training, score --prescreen-size architectures within the budget by this zero-cost "
            "proxy at initialisation (grad_norm | snip | synflow | naswot | zico; PROXY+macs ranks by the proxy's "
            "rank plus the MAC count's, e.g. zico+macs) and queue the best of them (non-dominated in score and "
            "cost) for training instead of the sampler's first picks; prescreen.csv lists every one. Default: the "
            "profile's (IBSR's quick profile: zico+macs; none elsewhere); none: no screen. --engine optuna only; the "
            "screen's time counts against --timeout."
        ),
    ] = None,
    prescreen_size: Annotated[
        Optional[int],
        typer.Option(
            help="Architectures the pre-screen scores; each costs one forward and backward pass of a batch of 4 "
            "(IBSR: 16³ patches). Default: the profile's (IBSR's quick profile: 300), else 100.",
            show_default=False,
        ),
    ] = None,
    prescreen_width: Annotated[
        Optional[float],
        typer.Option(
            help="Score each screened architecture's copy at this width multiplier (the same choices, width² of the "
            "compute; its costs stay the full network's). Default: the profile's (IBSR's quick profile: 0.25), "
            "else 1.",
            show_default=False,
        ),
    ] = None,
    engine_option: Annotated[
        Optional[list[str]],
        typer.Option(
            help="KEY=VALUE for --engine cakes (repeatable): shapes=1D|2D|1D+2D|2D+3D|1D+2D+3D, "
            "priority=performance|cost|both, width, steps, epochs, penalty; for --engine nni --strategy "
            "spos|darts|proxyless: candidates (per op and unit), width, steps, train_share, samples (spos), epochs."
        ),
    ] = None,
) -> None:
    """Multi-objective architecture search under a cost budget; re-run the same command to resume."""
    prepare_process("psc-search")
    from pathlib import Path

    from psc_nas.search.budget import Budget
    from psc_nas.search.display import console_for, make_display
    from psc_nas.search.interrupt import INTERRUPTS, sigint_raises

    settings = None
    try:
        # progress on stdout, live in a terminal, plain lines in a pipe or a batch log; errors on stderr
        with make_display(console_for()) as display, sigint_raises():
            display.stage("loading PyTorch, Lightning and Optuna")  # on screen before they load, seconds
            from psc_nas.search.runner import SearchSettings, parse_duration, run_search

            settings = SearchSettings(
                task=task,
                budget=Budget(count_option(budget, "--budget"), count_option(macs_budget, "--macs-budget")),
                objectives=tuple(name.strip() for name in objectives.split(",") if name.strip()),
                trials=trials,
                timeout=parse_duration(timeout) if timeout is not None else None,
                sampler=sampler,
                engine=engine,
                strategy=strategy,
                storage=storage,
                study_name=study_name,
                seed=seed,
                profile=profile,
                data_dir=Path(data_dir) if path_option(data_dir, "--data-dir") else None,
                out=Path(out) if path_option(out, "--out") else None,
                space=space,
                multi_fidelity=multi_fidelity,
                seed_presets=seed_presets,
                evaluator=evaluator,
                evaluator_options=parse_options(evaluator_option or []),
                retrain=retrain,
                budget_sampling=budget_sampling,
                engine_options=parse_options(engine_option or [], "--engine-option"),
                prescreen=prescreen,
                prescreen_size=prescreen_size,
                prescreen_width=prescreen_width,
            )
            run_search(settings)  # reports to the display entered above
    except (ValueError, OSError) as err:
        raise fail("psc-search", err) from None
    except INTERRUPTS:
        where = f" (run folder {settings.out_dir()})" if settings else ""
        typer.echo(
            f"psc-search: interrupted; finished results are kept, a trial in training is back in the queue and an "
            f"unfinished retraining runs again: re-run the same command to resume{where}",
            err=True,
        )
        raise typer.Exit(130) from None


def parse_options(items: list[str], flag: str = "--evaluator-option") -> tuple[tuple[str, Any], ...]:
    """``KEY=VALUE`` pairs, each value read as YAML (numbers, booleans, strings)."""
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            parsed.append((key.strip(), yaml.safe_load(value) if value.strip() else value))
        except yaml.YAMLError as err:
            raise ValueError(f"{flag} {key.strip()}: not a YAML value ({one_line(err)})") from None
    return tuple(parsed)


train_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@train_app.command()
def train(
    arch: Annotated[
        str,
        typer.Option(
            help="A preset (conv3d, p1sc1, p2sc2, p2sc3, csn_ip, csn_ir, cakes_uniform) or a config YAML/JSON."
        ),
    ],
    task: Annotated[str, typer.Option(help="Task to train on (e.g. ibsr).")] = "ibsr",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs; validation on whole volumes after each.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of weights, patch sampling and data order.")] = 0,
    data_dir: Annotated[Optional[str], typer.Option(help="Task data; default the task's own.")] = None,
    out: Annotated[
        Optional[str], typer.Option(help="Run folder; default runs/<task>-<arch>-<config hash>-s<seed>.")
    ] = None,
    samples_per_epoch: Annotated[
        Optional[int], typer.Option(min=1, help="Training patches per epoch; default the task's.")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Patches per step; default the task's.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train one architecture; write config.yaml, metrics.json, curve.csv and best.ckpt into its run folder."""
    prepare_process("psc-train")
    from pathlib import Path

    from psc_nas.tasks import get_task
    from psc_nas.train import TrainingFailed, fit_into, load_arch

    options = {"samples_per_epoch": samples_per_epoch, "batch_size": batch_size}
    try:
        task_def = get_task(task)
        data_dir = path_option(data_dir, "--data-dir")
        config, label = load_arch(arch, task_def)
        out = path_option(out, "--out")
        run_dir = Path(out) if out else Path("runs") / f"{task}-{label}-{config.hash}-s{seed}"
        result = fit_into(
            run_dir,
            config,
            task_def,
            epochs=epochs,
            seed=seed,
            data_dir=data_dir,
            progress=progress,
            data_options={k: v for k, v in options.items() if v is not None},
        )
    except (ValueError, OSError, TrainingFailed) as err:
        raise fail("psc-train", err) from None
    scores = ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
    typer.echo(
        f"{run_dir}: {result.epochs} epochs in {result.wall_seconds:.0f} s "
        f"({result.fwd_bwd_seconds:.0f} s forward+backward); {scores}"
    )
