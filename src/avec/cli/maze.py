"""``avec maze train|eval|cheese-vector|top-right|retarget``: the maze-policy steering study
(Mini, Turner et al. 2023) on avec's numpy maze and its behaviour-cloned CNN policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from avec.cli.args import count_arg, finite_float, output_dir, output_file, seed_arg
from avec.cli.common import emit_json
from avec.report import write_json


def _policy_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default=None,
                   help="policy .safetensors (default: the one shipped with avec)")


def _study_args(p: argparse.ArgumentParser, site_default: str) -> None:
    _policy_arg(p)
    p.add_argument("--mazes", type=count_arg, default=200,
                   help="held-out test mazes with a decision square (default 200)")
    p.add_argument("--seed", type=seed_arg, default=20230303, help="seed of the test mazes")
    p.add_argument("--site", default=site_default,
                   help=f"module whose output is steered (default {site_default})")
    p.add_argument("--output", "-o", required=True, type=output_dir,
                   help="output directory (JSON and PNGs)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_parsers(sub: Any) -> None:
    from avec.studies.maze.steering import CHEESE_SITE, RETARGET_SITE
    from avec.studies.maze.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("maze", help="steer a maze-solving CNN policy: train, eval, "
                       "cheese-vector, top-right, retarget",
                       description="The cheese vector of Mini, Turner et al. (2023) reproduced "
                       "on a numpy procgen-like maze with a behaviour-cloned IMPALA-style policy "
                       "(shipped with avec), steered by avec's own hooks.")
    msub = p.add_subparsers(dest="maze_command", required=True, metavar="STEP")

    q = msub.add_parser("train", help="behaviour-clone the policy (cheese in the top-right "
                        "region); the shipped policy is this command with its defaults")
    q.add_argument("--output", "-o", required=True, type=output_file,
                   help="policy .safetensors to write")
    q.add_argument("--world", type=count_arg, default=d.world,
                   help=f"world side (default {d.world})")
    q.add_argument("--min-size", type=count_arg, default=d.min_size,
                   help=f"smallest maze side (default {d.min_size})")
    q.add_argument("--region", type=count_arg, default=d.region,
                   help=f"cheese region side in the maze's top-right (default {d.region})")
    q.add_argument("--mazes", type=count_arg, default=d.mazes, help=f"training mazes ({d.mazes})")
    q.add_argument("--off-route", type=finite_float, default=d.off_route,
                   help=f"fraction of off-route cells kept as states ({d.off_route})")
    q.add_argument("--epochs", type=count_arg, default=d.epochs)
    q.add_argument("--lr", type=finite_float, default=d.lr)
    q.add_argument("--label-smoothing", type=finite_float, default=d.label_smoothing)
    q.add_argument("--batch-size", type=count_arg, default=d.batch_size)
    q.add_argument("--channels", default=",".join(map(str, d.channels)),
                   help="channels of the three conv stages (default %(default)s)")
    q.add_argument("--seed", type=seed_arg, default=d.seed)

    q = msub.add_parser("eval", help="the unsteered policy: decision-square probabilities "
                        "and vector-field pictures")
    _study_args(q, CHEESE_SITE)

    q = msub.add_parser("cheese-vector", help="subtract each maze's cheese vector; controls: "
                        "random same-norm, averaged, added instead")
    _study_args(q, CHEESE_SITE)
    q.add_argument("--coef", type=finite_float, default=1.0, help="vector scale (default 1)")

    q = msub.add_parser("top-right", help="add each maze's top-right vector; controls: "
                        "random same-norm, averaged, combined with the cheese vector")
    _study_args(q, CHEESE_SITE)
    q.add_argument("--coef", type=finite_float, default=1.0, help="vector scale (default 1)")

    q = msub.add_parser("retarget", help="clamp cheese-tracking channels at a target cell "
                        "(cheese removed) and measure the path probability to it")
    _study_args(q, RETARGET_SITE)
    q.add_argument("--channels", type=count_arg, default=4,
                   help="cheese channels to clamp (default 4)")
    q.add_argument("--scale", type=finite_float, default=3.0,
                   help="clamp value as a multiple of the channel's mean at the cheese")


def _write(out: Path, name: str, result: dict[str, Any]) -> Path:
    return write_json(out / name, result, indent=1)


def _load_policy(args: argparse.Namespace) -> Any:
    from avec.studies.maze.policy import default_policy_path, load_policy

    policy, _ = load_policy(args.policy or default_policy_path())
    return policy


def _print_summary(args: argparse.Namespace, title: str, summary: dict[str, Any],
                   files: list[Path]) -> None:
    if args.json:
        emit_json(summary)
        return
    print(title)
    for key, value in summary.items():
        if isinstance(value, dict):
            extra = "".join(f"  {k} {v}" for k, v in value.items() if k != "median")
            print(f"  {key:<34} median {value['median']:.3f}{extra}")
        else:
            print(f"  {key:<34} {value}")
    for path in files:
        print(f"wrote {path}")


def _train(args: argparse.Namespace) -> int:
    from avec.studies.maze.policy import save_policy
    from avec.studies.maze.train import TrainConfig, train_policy

    config = TrainConfig(world=args.world, min_size=args.min_size, region=args.region,
                         mazes=args.mazes, off_route=args.off_route, epochs=args.epochs,
                         lr=args.lr, label_smoothing=args.label_smoothing,
                         batch_size=args.batch_size, seed=args.seed,
                         channels=tuple(int(c) for c in args.channels.split(",")))

    def progress(row: dict[str, Any]) -> None:
        print(f"epoch {row['epoch']}/{config.epochs}  loss {row['loss']:.4f}  "
              f"val accuracy {row['val_accuracy']:.3f}  {row['seconds']:.0f}s", file=sys.stderr)

    policy, record = train_policy(config, progress)
    path = save_policy(policy, args.output, record)
    print(f"{record['parameters']} parameters, {record['samples']} states, val accuracy "
          f"{record['val_accuracy']:.3f}, {record['seconds']:.0f}s; wrote {path}")
    return 0


def _example_fields(policy: Any, out: Path, name: str, make_vector: Any, coef: float,
                    site: str, seed: int, count: int = 3, max_size: int | None = None
                    ) -> list[Path]:
    """Before/after vector-field pictures for the first ``count`` test mazes."""
    from avec.studies.maze.env import decision_square
    from avec.studies.maze.field import vector_field
    from avec.studies.maze.plots import plot_fields
    from avec.studies.maze.steering import policy_model, steering, held_out_mazes

    model = policy_model(policy, site)
    paths = []
    for i, maze in enumerate(held_out_mazes(seed, count, policy.config.world, min_size=9,
                                        max_size=max_size)):
        before = vector_field(policy, maze)
        panels = [("unsteered", before)]
        if make_vector is not None:
            with steering(model, make_vector(model, maze), coef):
                panels.append(("steered", vector_field(policy, maze)))
        square = decision_square(maze)
        marks = {"decision square": square.cell} if square else {}
        paths.append(plot_fields(panels, out / f"{name}_{i}.png", marks=marks))
    return paths


def _eval(args: argparse.Namespace) -> int:
    from avec.studies.maze.field import decision_probs
    from avec.studies.maze.steering import held_out_mazes

    policy = _load_policy(args)
    mazes = held_out_mazes(args.seed, args.mazes, policy.config.world)
    probs = [decision_probs(policy, m) for m in mazes]
    cheese = np.array([p.cheese for p in probs])
    corner = np.array([p.corner for p in probs])
    summary = {"mazes": len(mazes),
               "P(cheese | decision square)": {"median": round(float(np.median(cheese)), 4),
                                               "mean": round(float(cheese.mean()), 4)},
               "P(top-right | decision square)": {"median": round(float(np.median(corner)), 4),
                                                  "mean": round(float(corner.mean()), 4)},
               "fraction preferring cheese": round(float((cheese > corner).mean()), 4)}
    out = Path(args.output)
    files = [_write(out, "eval.json", {"summary": summary, "cheese": cheese.round(5).tolist(),
                                        "corner": corner.round(5).tolist()})]
    files += _example_fields(policy, out, "field", None, 0.0, args.site, args.seed)
    _print_summary(args, f"unsteered policy on {len(mazes)} test mazes (cheese anywhere)",
                   summary, files)
    return 0


def _study(args: argparse.Namespace, kind: str) -> int:
    from avec.studies.maze.plots import plot_distribution
    from avec.studies.maze.steering import (StudySettings, cheese_study, cheese_vector,
                                    top_right_study, top_right_vector)

    policy = _load_policy(args)
    settings = StudySettings(site=args.site, mazes=args.mazes, coef=args.coef, seed=args.seed)
    study, make, coef, key = ((cheese_study, cheese_vector, -args.coef, "cheese")
                              if kind == "cheese-vector" else
                              (top_right_study, top_right_vector, args.coef, "corner"))
    result = study(policy, settings)
    out = Path(args.output)
    stem = kind.replace("-", "_")
    files = [_write(out, f"{stem}.json", result)]
    names = [k[:-len(key) - 1] for k in result["rows"][0] if k.endswith("_" + key)]
    label = "P(cheese | decision square)" if key == "cheese" else "P(top-right | decision square)"
    files.append(plot_distribution({n: [r[f"{n}_{key}"] for r in result["rows"]] for n in names},
                                   f"{label}, {result['mazes']} test mazes",
                                   out / f"{stem}_box.png"))
    files += _example_fields(policy, out, f"{stem}_field", make, coef, args.site, args.seed,
                             max_size=policy.config.world - 2)
    _print_summary(args, f"{kind} at {args.site} on {result['mazes']} test mazes",
                   result["summary"], files)
    return 0


def _retarget(args: argparse.Namespace) -> int:
    from avec.studies.maze.field import vector_field
    from avec.studies.maze.plots import plot_fields
    from avec.studies.maze.steering import (CheeseChannel, RetargetSettings, held_out_mazes,
                                    policy_model, random_target, retarget_interventions,
                                    retarget_study, site_shape)
    from avec.intervene.steer import steer

    policy = _load_policy(args)
    settings = RetargetSettings(site=args.site, mazes=args.mazes, channels=args.channels,
                                scale=args.scale, seed=args.seed)
    result = retarget_study(policy, settings)
    out = Path(args.output)
    files = [_write(out, "retarget.json", result)]
    channels = [CheeseChannel(**c) for c in result["channels"]]  # the study's own channels
    model = policy_model(policy, args.site)
    shape = site_shape(policy, args.site)
    rng = np.random.default_rng(args.seed)
    for i, maze in enumerate(held_out_mazes(args.seed, 3, policy.config.world, min_size=9)):
        empty = maze.with_cheese(None)
        target = random_target(maze, rng)
        before = vector_field(policy, empty)
        with steer(model, retarget_interventions(policy, args.site, channels, target,
                                                 args.scale, shape)):
            after = vector_field(policy, empty)
        files.append(plot_fields([("no cheese", before), ("channels clamped", after)],
                                 out / f"retarget_field_{i}.png", marks={"target": target}))
    summary = {**result["summary"],
               "channels": [c["channel"] for c in result["channels"]]}
    _print_summary(args, f"retargeting {args.channels} channels at {args.site} on "
                   f"{args.mazes} test mazes", summary, files)
    return 0


def cmd_maze(args: argparse.Namespace) -> int:
    step = args.maze_command
    if step == "train":
        return _train(args)
    if step == "eval":
        return _eval(args)
    if step == "retarget":
        return _retarget(args)
    return _study(args, step)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"maze": cmd_maze}
