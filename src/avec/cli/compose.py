"""``avec compose``: do two (or more) steering vectors act independently? Each vector's effect
on its own score and on the others', both together, the additivity error and the cosine of
the directions, on a grid of coefficients."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from avec.cli import common
from avec.cli.args import count_arg, output_dir, seed_arg, steer_positions
from avec.cli.common import add_model_args, emit_json, log

DESCRIPTION = """Apply two or more steering vectors together, each at its own layers, at every
combination of their coefficients (a grid; each axis includes 0), and score greedy completions
of --prompts. Reported at an operating point: each vector's effect on its own score and on the
other scores (cross-talk, also relative to its own effect), the effect of all together, the
additivity error |effect(together) - sum of single effects| with its standard error over
prompts, and the cosine of the directions at each layer they share (or across their layers
when they share none). With --maze the vectors are each test maze's own cheese and top-right
vectors of the maze policy, scored by P(cheese) and P(top-right) at the decision square.
Writes compose.json (every cell, every prompt) and compose.png (per score: measured,
additive prediction and interaction over the (c1, c2) grid; compose_I_J.png per pair for more
than two vectors)."""

DEFAULT_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0)
# options of one mode that the other refuses (dest, flag)
LANGUAGE_ONLY = (("vector", "--vector"), ("score", "--score"), ("extra_score", "--extra-score"),
                 ("layers", "--layers"), ("prompts", "--prompts"),
                 ("max_new_tokens", "--max-new-tokens"), ("positions", "--positions"),
                 ("model", "--model"), ("block_path", "--block-path"))
MAZE_ONLY = (("policy", "--policy"), ("mazes", "--mazes"), ("seed", "--seed"),
             ("site", "--site"))


def _add_compose_parser(sub: Any) -> None:
    p = sub.add_parser("compose", help="do steering vectors compose: effects, cross-talk and "
                       "additivity on a grid of coefficients", description=DESCRIPTION)
    p.add_argument("--vector", action="append", metavar="FILE",
                   help="a vector file (.safetensors or .gguf); give two or more")
    p.add_argument("--score", action="append", metavar="SPEC",
                   help="the score each vector is meant to move, one per --vector in the same "
                        "order: [NAME=]keywords:w1,w2 (share of completions with one of the "
                        "words), [NAME=]concept:TEXT (embedding similarity to TEXT) or "
                        "[NAME=]refusal")
    p.add_argument("--extra-score", action="append", metavar="SPEC", default=None,
                   help="another score to read on every cell (same forms; repeat)")
    p.add_argument("--coefs", action="append", metavar="LIST",
                   help="comma-separated coefficients, 0 included (added if missing): once for "
                        "every vector or once per vector. Default: 0,0.5,1,1.5,2 times each "
                        "vector's recommended coefficient (`avec tune`); with --maze "
                        "-1,-0.5,0,0.5,1. A list that starts with '-' needs '=': "
                        "--coefs=-1,0,1")
    p.add_argument("--layers", action="append", metavar="SPEC",
                   help="layers each vector steers (14, 4,8,12 or 4-20[:step]): once for every "
                        "vector or once per vector (default: its recommended layers, else all "
                        "of its layers)")
    p.add_argument("--at", metavar="LIST",
                   help="the operating point the summary is read at: one nonzero coefficient "
                        "per vector, each on its grid (default: each axis's largest magnitude; "
                        "with --maze the most negative cheese and largest top-right "
                        "coefficient)")
    p.add_argument("--prompts", help="prompts file (.txt one per line, .json, .jsonl); default: "
                   "avec's 16 everyday prompts")
    p.add_argument("--max-new-tokens", type=count_arg, default=None,
                   help="tokens per completion (default 40)")
    p.add_argument("--positions", type=steer_positions, default=None,
                   help="where the vectors are added: all (default), prompt, generated, "
                        "from:K")
    p.add_argument("--no-chat", action="store_true", help="no chat template")
    p.add_argument("--batch-size", type=count_arg, default=32, help="rows per batch (32)")
    p.add_argument("--pad", action="store_true",
                   help="let prompts of different lengths share left-padded batches: far fewer "
                        "passes, logits equal to the unpadded ones within float tolerance (give "
                        "a --batch-size that is a multiple of the number of cells, so all cells "
                        "of a prompt share a batch)")
    p.add_argument("--max-cells", type=count_arg, default=400,
                   help="refuse grids with more cells than this (default 400)")
    p.add_argument("--maze", action="store_true",
                   help="compose the maze policy's cheese and top-right vectors instead")
    p.add_argument("--policy", default=None,
                   help="with --maze: policy .safetensors (default: the shipped one)")
    p.add_argument("--mazes", type=count_arg, default=None,
                   help="with --maze: test mazes (default 200)")
    p.add_argument("--seed", type=seed_arg, default=None,
                   help="with --maze: seed of the test mazes (default 20230303)")
    p.add_argument("--site", default=None,
                   help="with --maze: the module both vectors are read at and added to "
                        "(default embedder.block2.res1.resadd)")
    p.add_argument("-o", "--output-dir", required=True, type=output_dir)
    add_model_args(p)


# ---- argument checks ---------------------------------------------------------------------------

def _floats(text: str, flag: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{flag} {text[:60]!r}: {part.strip()[:20]!r} is not a number") \
                from None
        if not math.isfinite(value) or abs(value) > 3.4e38:
            raise ValueError(f"{flag} {text[:60]!r}: {part.strip()[:20]!r} is not a finite "
                             f"float32 number")
        out.append(value)
    return out


def _axis(text: str, flag: str) -> tuple[float, ...]:
    from avec.evaluate.compose import check_axis

    values = _floats(text, flag)
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} {text[:60]!r}: a coefficient repeats")
    if 0.0 not in values:
        values.append(0.0)
    try:
        return check_axis(values, flag)
    except ValueError as exc:
        raise ValueError(f"{flag} {text[:60]!r}: {exc}") from None


def _per_vector(values: list[str] | None, n: int, flag: str) -> list[str] | None:
    """One value for all vectors, or one per vector."""
    if not values:
        return None
    if len(values) not in (1, n):
        raise ValueError(f"{flag} given {len(values)} times for {n} vectors; give it once "
                         f"(for all) or once per vector")
    return values * n if len(values) == 1 else values


def _check_mode(args: argparse.Namespace) -> None:
    """Refuse options the chosen mode does not use, naming them."""
    wrong = MAZE_ONLY if not args.maze else LANGUAGE_ONLY
    given = [flag for dest, flag in wrong if getattr(args, dest) not in (None, [], False)]
    if args.maze and args.no_chat:
        given.append("--no-chat")
    if args.maze and args.pad:
        given.append("--pad")
    if args.maze and args.dtype != "float32":
        given.append("--dtype")
    if given:
        mode = "with --maze" if args.maze else "without --maze (they apply to the maze policy)"
        raise ValueError(f"{', '.join(given)} cannot be used {mode}")


def _check_grid(axes: Sequence[Sequence[float]], names: Sequence[str], max_cells: int) -> None:
    cells = math.prod(len(a) for a in axes)
    if cells > max_cells:
        shape = " x ".join(str(len(a)) for a in axes)
        raise ValueError(f"--coefs: the grid has {cells} cells ({shape} for "
                         f"{', '.join(names)}), more than --max-cells {max_cells}; give fewer "
                         f"coefficients or raise --max-cells")


def _operating_point(text: str | None, axes: Sequence[Sequence[float]], names: Sequence[str],
                     default: Sequence[float] | None = None) -> tuple[float, ...]:
    from avec.evaluate.compose import default_at

    if text is None:
        return tuple(default if default is not None else default_at(axes))
    at = _floats(text, "--at")
    if len(at) != len(names):
        raise ValueError(f"--at {text[:60]!r}: give {len(names)} coefficients, one per vector "
                         f"({', '.join(names)})")
    for name, axis, c in zip(names, axes, at):
        if c == 0 or c not in axis:
            raise ValueError(f"--at {text[:60]!r}: {c:g} for {name} must be a nonzero "
                             f"coefficient of its grid {list(axis)}")
    return tuple(at)


def _names(paths: Sequence[str]) -> list[str]:
    """File stems, made unique with #2, #3 ... when they repeat."""
    out: list[str] = []
    for path in paths:
        stem = Path(path).stem or "vector"
        name, k = stem, 2
        while name in out:
            name, k = f"{stem}#{k}", k + 1
        out.append(name)
    return out


# ---- the two modes -----------------------------------------------------------------------------

def cmd_compose(args: argparse.Namespace) -> int:
    _check_mode(args)
    return _maze(args) if args.maze else _language(args)


def _scores(args: argparse.Namespace, n: int) -> tuple[list[Any], list[str]]:
    """The distinct scores to read and the target score of each vector. Several vectors may
    share a target (the same spec); an extra score needs a name of its own."""
    from avec.studies.compose.language import parse_score

    if not args.score or len(args.score) != n:
        raise ValueError(f"--score given {len(args.score or [])} times for {n} vectors; give "
                         f"one per --vector, in the same order (the score it is meant to move)")
    parsed = []
    for flag, specs in (("--score", args.score), ("--extra-score", args.extra_score or [])):
        for spec in specs:
            try:
                parsed.append((flag, parse_score(spec)))
            except ValueError as exc:
                raise ValueError(f"{flag}: {exc}") from None
    unique: dict[str, Any] = {}
    for flag, score in parsed:
        if score.name in unique and (flag == "--extra-score" or unique[score.name] != score):
            raise ValueError(f"{flag}: the name {score.name!r} is already used by another "
                             f"score; give it its own NAME=...")
        unique[score.name] = score
    return list(unique.values()), [score.name for _flag, score in parsed[:n]]


def _language(args: argparse.Namespace) -> int:
    from avec.data.demo import TUNE_PROMPTS
    from avec.data.pairs import load_located_prompts
    from avec.evaluate.compose import analyse, direction_cosines
    from avec.evaluate.sweep import parse_layers
    from avec.studies.compose.language import language_grid
    from avec.studies.compose.report import write
    from avec.vector import load_vector

    paths = args.vector or []
    if len(paths) < 2:
        raise ValueError("give two or more --vector files (or --maze for the maze policy)")
    n = len(paths)
    names = _names(paths)
    scores, targets = _scores(args, n)
    coef_texts = _per_vector(args.coefs, n, "--coefs")
    layer_texts = _per_vector(args.layers, n, "--layers")
    axes = [_axis(t, "--coefs") for t in coef_texts] if coef_texts else None
    if axes is not None:  # checked before the model loads
        _check_grid(axes, names, args.max_cells)
        _operating_point(args.at, axes, names)
    layer_lists = [parse_layers(t) for t in layer_texts] if layer_texts else None
    located = (load_located_prompts(args.prompts) if args.prompts
               else [(f"default prompt {i + 1}", p) for i, p in enumerate(TUNE_PROMPTS)])
    if not located:
        raise ValueError(f"--prompts {args.prompts}: no prompts in the file")
    max_new = args.max_new_tokens or 40
    chat = False if args.no_chat else None

    model = common.load_model_for(args)
    vectors, used_layers, recommended = {}, {}, {}
    for j, (name, path) in enumerate(zip(names, paths)):
        vec = load_vector(path, model)
        rec = recommended[name] = vec.recommended
        if layer_lists is not None:
            layers = model.check_layers(layer_lists[j])
            missing = [L for L in layers if L not in vec.directions]
            if missing:
                raise ValueError(f"--layers: {path} has no layer(s) {missing}; it has "
                                 f"{vec.layers}")
        else:
            layers = list(rec.layers) if rec is not None else vec.layers
        vectors[name] = vec.select(layers)
        used_layers[name] = layers
    if axes is None:
        axes = []
        for name, path in zip(names, paths):
            rec = recommended[name]
            if rec is None:
                raise ValueError(f"--coefs: {path} has no recommended setting (`avec tune`) to "
                                 f"scale; give coefficients, e.g. --coefs 0,2,4,8")
            axes.append(tuple(sorted({round(k * rec.coef, 6) for k in DEFAULT_SCALES})))
        _check_grid(axes, names, args.max_cells)
    at = _operating_point(args.at, axes, names)
    common.check_fit(model, located, chat, max_new)
    prompts = [text for _where, text in located]
    cells = math.prod(len(a) for a in axes)
    log(f"composing {', '.join(names)}: {cells} cells x {len(prompts)} prompts = "
        f"{cells * len(prompts)} completions of up to {max_new} tokens")
    result = language_grid(model, vectors, axes, scores, targets, prompts,
                           max_new_tokens=max_new, chat=chat,
                           positions=args.positions or "all", batch_size=args.batch_size,
                           pad=args.pad, progress=True)
    comp = analyse(result.grid, at)
    cosines = direction_cosines(vectors)
    info = {"kind": "language", "model": model.identity(),
            "vectors": [{"name": nm, "file": str(p), "layers": used_layers[nm],
                         "norms": {str(k): round(v, 6) for k, v in vectors[nm].norms().items()}}
                        for nm, p in zip(names, paths)],
            "scores": [s.describe() for s in scores], "prompts": prompts,
            "max_new_tokens": max_new, "chat": chat, "positions": args.positions or "all",
            "pad": args.pad, "batch_size": args.batch_size,
            "rows": result.rows, "seconds": round(result.seconds, 1),
            "cpu_seconds": round(result.cpu_seconds, 1), "samples": result.samples}
    files = write(args.output_dir, comp, cosines, info,
                  title=f"{' + '.join(names)} on {model.name}")
    return _report(args, comp, cosines, files, result.seconds)


def _maze(args: argparse.Namespace) -> int:
    from avec.evaluate.compose import analyse
    from avec.studies.compose.maze import VECTORS, MazeComposeSettings, maze_grid
    from avec.studies.compose.report import write
    from avec.studies.maze.policy import default_policy_path, load_policy

    defaults = MazeComposeSettings()
    coef_texts = _per_vector(args.coefs, 2, "--coefs")
    axes = ([_axis(t, "--coefs") for t in coef_texts] if coef_texts
            else [defaults.cheese_coefs, defaults.top_right_coefs])
    _check_grid(axes, VECTORS, args.max_cells)
    at = _operating_point(args.at, axes, VECTORS, default=(min(axes[0]), max(axes[1])))
    policy, _ = load_policy(args.policy or default_policy_path())
    settings = MazeComposeSettings(site=args.site or defaults.site,
                                   mazes=args.mazes or defaults.mazes,
                                   seed=defaults.seed if args.seed is None else args.seed,
                                   cheese_coefs=tuple(axes[0]), top_right_coefs=tuple(axes[1]))
    sites = dict(policy.named_modules())
    if settings.site not in sites:
        raise ValueError(f"--site {settings.site!r} is not a module of the policy; e.g. "
                         f"{defaults.site}")
    log(f"composing the cheese and top-right vectors on {settings.mazes} mazes, "
        f"{len(axes[0]) * len(axes[1])} cells each")
    result = maze_grid(policy, settings)
    comp = analyse(result.grid, at)
    cos = result.cosine_summary()
    cosines = [{"a": VECTORS[0], "b": VECTORS[1], "layer_a": settings.site,
                "layer_b": settings.site, "shared": True, "cosine": cos["median"],
                "per_maze": cos}]
    info = {"kind": "maze", "policy": str(args.policy or default_policy_path().name),
            **result.describe()}
    files = write(args.output_dir, comp, cosines, info,
                  title=f"cheese + top-right vectors, {settings.mazes} mazes ({settings.site})")
    return _report(args, comp, cosines, files, result.seconds)


def _report(args: argparse.Namespace, comp: Any, cosines: list[dict[str, Any]],
            files: dict[str, str], seconds: float) -> int:
    from avec.studies.compose.report import summary, text_lines

    if args.json:
        emit_json({**summary(comp, cosines), "seconds": round(seconds, 1), "files": files})
        return 0
    for line in text_lines(comp, cosines):
        print(line)
    print(f"{seconds:.0f} s")
    for name, path in files.items():
        print(f"wrote {name}: {path}")
    return 0


def add_parsers(sub: Any) -> None:
    _add_compose_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"compose": cmd_compose}
