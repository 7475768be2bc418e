"""The ``pyro-hvae`` command line: thin wrappers over the library.

Every expected failure (bad config, missing data, unusable run folder or checkpoint,
diverged training) prints one ``error: ...`` line, without a traceback, and exits 2.
Under torchrun (``train`` and ``evaluate``, see :mod:`pyro_hvae.distributed`) a failure on
any rank stops every rank, and rank 0 alone prints it and the results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pyro_hvae import __version__


class _ExpectedFailures(click.Group):
    """Turns the library's expected errors into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        from pyro_hvae.config import ConfigError
        from pyro_hvae.data import DataError
        from pyro_hvae.distributed import RanksFailed
        from pyro_hvae.run import RunError
        from pyro_hvae.train import TrainingError

        try:
            return super().invoke(ctx)
        except (ConfigError, DataError, RunError, TrainingError) as err:
            if isinstance(err, RanksFailed) and not err.on_main:
                ctx.exit(2)  # rank 0 prints it
            for line in str(err).splitlines():
                click.echo(f"error: {line}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: last.pt holds the last checkpoint; continue with --resume RUN_DIR", err=True)
            ctx.exit(130)


@click.group(cls=_ExpectedFailures, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pyro-hvae")
def main() -> None:
    """Deep hierarchical VAEs as Pyro programs: train, evaluate and use them."""


@main.command()
@click.argument("args", nargs=-1, metavar="CONFIG [KEY=VALUE ...]")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder (default: runs/<name>-<timestamp>).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), help="Overrides the config's device.")
@click.option("--resume", type=click.Path(path_type=Path), metavar="RUN_DIR", help="Continue the run in RUN_DIR from its last.pt.")
@click.option("--force", is_flag=True, help="Overwrite a run already in --out.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
def train(args, out, device, resume, force, print_config):
    """Train the hierarchy described by CONFIG, with dotted KEY=VALUE overrides
    (e.g. optim.lr=3e-4 model.latent_dims=[32,16,8])."""
    from pyro_hvae.config import dump_config
    from pyro_hvae.data import load_splits
    from pyro_hvae.distributed import launch
    from pyro_hvae.run import RunError, prepare_run_dir, record_resume
    from pyro_hvae.train import Trainer, resolve_device

    with launch() as world:
        # files first, on every rank, each block agreed: no collective is left waiting on a rank that failed
        with world.agree():
            cfg, state, run_dir = _training_config(args, out, resume, force)
        if print_config:
            if world.is_main:
                click.echo(dump_config(cfg), nl=False)
            return
        with world.agree():
            target = resolve_device(device or cfg.device, world.local_rank if world.is_distributed else None)
            splits = load_splits(cfg.data)  # before the run folder: missing data leaves nothing behind
            if resume is not None:
                trained_on, now = state.get("data", {}).get("sha256"), splits.describe().get("sha256")
                if trained_on and now and trained_on != now:
                    raise RunError(
                        f"--resume: the images at data.path differ from those the run was trained on (sha256 {now[:12]}..., "
                        f"the run's {trained_on[:12]}...); point data.path at the original files or start a new run"
                    )
        run_dir = world.from_main(run_dir)  # a default name holds rank 0's clock
        overrides = list(args if resume is not None else args[1:])
        with world.agree():
            # builds and checks the hierarchy, writing nothing: an unusable model leaves nothing behind
            trainer = Trainer(cfg, run_dir, device=target, splits=splits, overrides=overrides, world=world)
            if resume is None and world.is_main:
                prepare_run_dir(run_dir, force=force)
            if resume is not None:
                trainer.load_state_dict(state)
                if world.is_main:
                    record_resume(run_dir, trainer.step, overrides)
        if world.is_main:
            where = f"{target}" if not world.is_distributed else f"{world.size} processes ({target.type})"
            doing = f"resuming {run_dir} at step {trainer.step}" if resume is not None else f"training into {run_dir}"
            click.echo(f"{doing} on {where}", err=True)
        with world.agree():  # training's own errors come on every rank together
            summary = trainer.fit()
        if world.is_main:
            click.echo(json.dumps(summary))


def _training_config(args, out, resume, force):
    """The config, the resume state (or None) and the run folder of ``pyro-hvae train``,
    read and checked before anything is written."""
    from pyro_hvae.config import architecture_changes, data_stream_changes, load_config
    from pyro_hvae.run import RunError, default_run_dir
    from pyro_hvae.train import load_for_resume

    state = None
    if resume is not None:
        if out is not None or force:
            raise RunError("--resume continues RUN_DIR in place; drop --out/--force")
        if args and "=" not in args[0]:
            raise RunError(f"--resume takes its config from {resume}/config.yaml; pass only KEY=VALUE overrides, not {args[0]!r}")
        state = load_for_resume(resume)
        saved = load_config(resume / "config.yaml")
        cfg = load_config(resume / "config.yaml", args)
        changed = architecture_changes(saved, cfg)
        if changed:
            raise RunError(f"--resume: overrides change the architecture ({', '.join(changed)}); a resumed run keeps it: start a new run instead")
        changed = data_stream_changes(saved, cfg)
        if changed:
            raise RunError(f"--resume: overrides change the training batches ({', '.join(changed)}); a resumed run keeps them: start a new run instead")
        if cfg.optim.name != saved.optim.name:
            raise RunError(
                f"--resume: optim.name cannot change ({saved.optim.name} -> {cfg.optim.name}): the saved moment "
                "estimates belong to the old optimizer; keep it, or start a new run"
            )
        run_dir = resume
    else:
        if not args:
            raise click.UsageError("missing CONFIG (a YAML file, e.g. examples/mnist.yaml)")
        cfg = load_config(args[0], args[1:])
        run_dir = out if out is not None else default_run_dir(cfg.name)
    return cfg, state, run_dir


@main.command()
@click.argument("target", type=click.Path(path_type=Path), metavar="RUN_DIR_OR_CHECKPOINT")
@click.option("--num-samples", "-K", type=int, default=None, help="Importance samples per image (default: the run's eval.num_samples).")
@click.option("--split", type=click.Choice(["test", "val"]), default=None, help="Data split (default: the run's eval.split).")
@click.option("--images", "num_images", type=int, default=None, help="Evaluate only the first N images of the split, in file order (default: all).")
@click.option("--batch-size", type=int, default=None, help="Images per batch (default: the run's eval.batch_size).")
@click.option("--chunk-size", type=int, default=None, help="Importance samples per forward pass (default: the run's eval.chunk_size, else the most that fit in 1 GiB on CPU or half the free GPU memory).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the importance samples.")
@click.option("--marginal-samples", type=int, default=100, show_default=True, help="Guide samples per image behind the marginal active-unit counts; 0 skips them (on a conv ladder they cost more than K = 100 importance samples).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="results.json path (default: RUN_DIR/eval-<split>-K<K>[-first<N>]/results.json).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing results.")
def evaluate(target, num_samples, split, num_images, batch_size, chunk_size, seed, marginal_samples, out, device, force):
    """Importance-weighted log-likelihood of a trained run, with PSIS diagnostics
    (under torchrun: the images shared out over the processes)."""
    from pyro_hvae.distributed import launch
    from pyro_hvae.evaluate import evaluate_checkpoint
    from pyro_hvae.train import resolve_device

    with launch() as world:
        with world.agree():
            target_device = resolve_device(device, world.local_rank if world.is_distributed else None)
        results = evaluate_checkpoint(
            target,
            num_samples=num_samples,
            split=split,
            num_images=num_images,
            batch_size=batch_size,
            chunk_size=chunk_size,
            seed=seed,
            out=out,
            device=target_device,
            force=force,
            marginal_samples=marginal_samples,
            world=world,
        )
    if world.is_main:
        click.echo(json.dumps({k: results[k] for k in ("nll_nats", "nll_bits_per_dim", "elbo", "num_samples", "num_images", "chunk_size", "split", "results")}))


_run_argument = click.argument("target", type=click.Path(path_type=Path), metavar="RUN_DIR_OR_CHECKPOINT")
_device_option = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True)


def _use_options(default_out: str):
    """The options every use verb shares: --seed, --out, --force, --device."""

    def decorate(command):
        for option in reversed(
            [
                click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw."),
                click.option("--out", type=click.Path(path_type=Path), default=None, help=f"Output folder (default: {default_out})."),
                click.option("--force", is_flag=True, help="Overwrite earlier outputs in that folder."),
                _device_option,
            ]
        ):
            command = option(command)
        return command

    return decorate


@main.command()
@_run_argument
@click.option("--num", type=int, default=64, show_default=True, help="Number of images.")
@click.option("--temperature", "-T", type=float, default=1.0, show_default=True, help="Scale of every prior's standard deviation (> 0).")
@click.option("--draw", is_flag=True, help="Draw x ~ p(x | z) instead of showing E[x | z].")
@_use_options("RUN_DIR/sample-T<temperature>")
def sample(target, num, temperature, draw, seed, out, force, device):
    """Prior samples of a trained run at a temperature: a PNG grid and the images as .npz."""
    from pyro_hvae.train import resolve_device
    from pyro_hvae.use_run import sample_run

    folder = sample_run(target, num=num, temperature=temperature, mean=not draw, seed=seed, out=out, force=force, device=resolve_device(device))
    click.echo(str(folder))


@main.command()
@_run_argument
@click.option("--num", type=int, default=32, show_default=True, help="Number of images (the first of the split).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--draw", is_flag=True, help="Draw x' ~ p(x' | z) instead of showing E[x' | z].")
@_use_options("RUN_DIR/reconstruct-<split>")
def reconstruct(target, num, split, draw, seed, out, force, device):
    """Images of a split beside their reconstructions: a PNG grid and the tensors as .npz."""
    from pyro_hvae.train import resolve_device
    from pyro_hvae.use_run import reconstruct_run

    folder = reconstruct_run(target, num=num, split=split, mean=not draw, seed=seed, out=out, force=force, device=resolve_device(device))
    click.echo(str(folder))


@main.command()
@_run_argument
@click.option("--mask", default="center", show_default=True, help="center, left, right, top, bottom, random (the region hidden), or a .npy file of booleans, True where observed.")
@click.option("--method", type=click.Choice(["mwg", "pseudo_gibbs", "conditional"]), default="mwg", show_default=True, help="Metropolis-within-Gibbs (exact) or pseudo-Gibbs; 'conditional' for a run of model.kind: conditional_ladder, which draws from its own p(hidden | border).")
@click.option("--num", type=int, default=16, show_default=True, help="Number of images (the first of the split).")
@click.option("--steps", type=int, default=100, show_default=True, help="Sampler steps (for 'conditional': draws).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@_use_options("RUN_DIR/inpaint-<mask>-<method>")
def inpaint(target, mask, method, num, steps, split, seed, out, force, device):
    """Fill the pixels a mask hides: a PNG grid (original | masked | filled) and the tensors as .npz."""
    from pyro_hvae.train import resolve_device
    from pyro_hvae.use_run import inpaint_run

    folder = inpaint_run(
        target, mask=mask, method=method, num=num, num_steps=steps, split=split, seed=seed, out=out, force=force, device=resolve_device(device)
    )
    click.echo(str(folder))

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
