"""The one training loop: mesh, task, sharded state (fresh or resumed from the workdir), the grain
iterator, the jitted step, logging, periodic evaluation, checkpoints, preemption, SIGTERM and Ctrl-C.

Nothing non-finite is saved: every step folds "the loss and the parameter norm are finite" into a
device scalar (the first step where they were not; no host sync), read at each log, evaluation and
checkpoint step; before every save the whole train state (params, optimizer state, EMA, model
state) is checked with one jitted reduction (``state.first_non_finite``). A non-finite state stops
the run with a one-line ``TrainingError`` naming the first non-finite array and the step; the last
good checkpoint stays the latest.

SIGTERM and the first Ctrl-C (SIGINT) end the run after the current step with a checkpoint; a
second Ctrl-C aborts at once (``KeyboardInterrupt``, no checkpoint). The previous handlers are
restored when the loop ends."""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from titok_jax import data as data_lib
from titok_jax.checkpoint import Checkpointer, write_config
from titok_jax.errors import TrainingError, WriteWarning
from titok_jax.evaluation import plots
from titok_jax.evaluation.images import save_png
from titok_jax.models.registry import resolve_compute_dtype
from titok_jax.tasks import EvalContext
from titok_jax.train import memory
from titok_jax.train import sharding as sharding_lib
from titok_jax.train.metrics_writer import MetricWriter
from titok_jax.train.parts import build_parts
from titok_jax.train.state import create_state, first_non_finite
from titok_jax.train.step import build_step, step_options


class Trainer:
    """Everything a run needs, built from a config and a workdir (also used by ``eval``)."""

    def __init__(self, config: Any, workdir: str, inference: bool = False):
        """``inference=True`` (``eval``): the task is built for inference, so it reads no
        training-only file (a FlexTok's VAE or REPA teacher: the checkpoint holds what it needs)."""
        self.config, self.workdir = config, os.path.abspath(workdir)
        # mesh, task, abstract state + shardings, optimizer: everything but the workdir
        self.parts = build_parts(config, inference=inference)
        os.makedirs(self.workdir, exist_ok=True)
        p = self.parts
        self.mesh, self.rules, self.task, self.use_ema = p.mesh, p.rules, p.task, p.use_ema
        self.abstract, self.shardings, self.optimizer = p.abstract, p.shardings, p.optimizer
        ck = config.checkpoint
        self.checkpointer = Checkpointer(self.workdir, ck.every_steps, ck.get("keep", 3),
                                         ck.get("keep_every_steps", 0), ck.get("async_save", True))
        self.writer = MetricWriter(self.workdir)
        self._constants = None  # the task's host constants, computed once
        self.pictures: dict[str, str] = {}  # name -> path of the last evaluation's pictures

    # ------------------------------------------------------------------ state
    def abstract_with_shardings(self) -> Any:
        return self.parts.abstract_with_shardings()

    def initial_state(self, data_iter: Any = None) -> tuple[Any, str]:
        """Latest checkpoint of the workdir if there is one (restoring ``data_iter`` too), else
        a fresh state. Returns ``(state, how)``."""
        if self.checkpointer.latest_step() is not None:
            state, step = self.checkpointer.restore(self.abstract_with_shardings(), data_iter)
            return state, f"resumed from step {step}"
        state = create_state(self.task.init, self.optimizer, self.use_ema, self.shardings,
                             int(self.config.seed))
        return state, "initialised from scratch"

    def eval_params(self, state: Any) -> Any:
        return state.ema_params if state.ema_params is not None else state.params["model"]

    def constants(self) -> Any:
        """The task's frozen host constants (LPIPS, a teacher...), read once."""
        if self._constants is None:
            self._constants = self.task.constants()
        return self._constants

    def run_eval(self, state: Any, step: int) -> tuple[dict, str | None]:
        """``task.evaluate`` of a train state on the held-out data (see ``evaluate``)."""
        return self.evaluate(self.eval_params(state), state.model_state["model"], step)

    def evaluate_checkpoint(self, step: int | None = None) -> tuple[int, dict, str | None]:
        """``evaluate`` of the workdir's checkpoint (latest, or ``step``), reading only what
        inference reads (the EMA or model params and the model state, sharded like the trainer's):
        a trained run or an ``import-torch`` workdir alike. Returns ``(step, metrics, image path)``."""
        from titok_jax.checkpoint import restore_model

        a, sh = self.abstract, self.shardings
        with_sharding = lambda tree, shs: jax.tree.map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shs)
        params = (with_sharding(a.ema_params, sh.ema_params) if self.use_ema
                  else with_sharding(a.params["model"], sh.params["model"]))
        params, model_state, step = restore_model(
            self.workdir, params, with_sharding(a.model_state["model"], sh.model_state["model"]),
            use_ema=self.use_ema, step=step)
        return (step, *self.evaluate(params, model_state, step))

    def evaluate(self, model_params: Any, model_state: Any, step: int) -> tuple[dict, str | None]:
        """``task.evaluate`` on the held-out data; writes ``eval.jsonl`` and every image the task
        returns as ``samples/{name}_{step:09d}.png`` (and to TensorBoard), then refreshes
        ``curves.png`` from ``metrics.jsonl`` and ``eval.jsonl`` (``evaluation.plots``; a failed
        plot is a warning). ``self.pictures``: ``{name: path}`` of what was written. Returns
        ``(metrics, path of the first image or None)``."""
        cfg = self.config
        ctx = EvalContext(config=cfg, mesh=self.mesh, step=int(step),
                          max_images=int(cfg.data.get("eval_num_images", 0) or 0),
                          constants=self._constants)  # None: the task reads what it needs
        result = self.task.evaluate(model_params, model_state, ctx)
        first_path = None
        self.pictures = {}
        try:  # a read-only or full workdir costs the grid and the log line, not the metrics
            if jax.process_index() == 0:
                for name, image in result.images.items():
                    path = os.path.join(self.workdir, "samples", f"{name}_{int(step):09d}.png")
                    save_png(path, image)
                    self.writer.image(name, image, step)
                    first_path = first_path or path
                    self.pictures[name] = path
            self.writer.write("eval.jsonl", step, result.metrics, prefix="eval/")
            self.writer.flush()
        except OSError as e:
            warnings.warn(WriteWarning(f"could not write the evaluation of step {step} to "
                                       f"{self.workdir}: {e.strerror or e}"))
        if jax.process_index() == 0:
            curves = plots.try_plot(f"the training curves in {self.workdir}", plots.write_curves,
                                    self.workdir)
            if curves:
                self.pictures["curves"] = curves
        return result.metrics, first_path


def eval_summary(metrics: dict) -> str:
    """The one status line of an evaluation (PSNR/SSIM for tokenizers, token accuracy for generators)."""
    if "psnr" in metrics:
        line = f"psnr {metrics['psnr']:.2f} dB, ssim {metrics['ssim']:.4f}"
        if "thumbnail_psnr" in metrics:   # discrete tokenizers: the same-bit thumbnail baseline
            line += (f"; {metrics['bits_per_image']:.0f} bits per image, the same-bit thumbnail "
                     f"({metrics['thumbnail_side']}x{metrics['thumbnail_side']} at "
                     f"{metrics['thumbnail_bits']} bits per channel) {metrics['thumbnail_psnr']:.2f} dB")
        return line
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _check_finite(metrics: dict, step: int) -> None:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
        raise TrainingError(f"the loss became non-finite ({loss}) at step {step} (non-finite terms: "
                            f"{', '.join(bad)}); no checkpoint was written for it. Lower the learning "
                            f"rate or check the data.")


# The step's metrics whose finiteness is tracked at every step (the parameter norm is non-finite
# exactly when some model parameter is, short of an overflow of the sum of squares).
WATCHED_METRICS = ("loss", "param_norm/model")


@jax.jit
def _first_bad_step(first: jax.Array, step: jax.Array, values: tuple) -> jax.Array:
    """``first`` (-1 while every watched value was finite) becomes ``step`` the first time one of
    ``values`` is not finite; it never changes after that."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))
    return jnp.where((first < 0) & ~finite, step.astype(jnp.int32), first)


def _watched(metrics: dict) -> tuple:
    return tuple(metrics[k] for k in WATCHED_METRICS if k in metrics)


def _check_state(state: Any, step: int, first_bad: int, latest: int | None) -> None:
    """A ``TrainingError`` (one line) when ``state`` holds a non-finite array: names the first one,
    the step where the watched metrics first went non-finite (``first_bad``, or -1) and the last
    good checkpoint (``latest``)."""
    path = first_non_finite(state)
    if path is None:
        return
    when = (f"at step {step}" if first_bad < 0 or first_bad == step
            else f"at step {first_bad} (found at step {step})")
    kept = (f"the latest checkpoint (step {latest}) is the last good one" if latest is not None
            else "no checkpoint was written")
    raise TrainingError(f"the train state became non-finite {when}: the first non-finite array is "
                        f"{path}; it was not saved and {kept}. Lower the learning rate or check "
                        f"the data.")


class StopSignals:
    """SIGTERM and SIGINT while the loop runs: the first one sets ``signal`` (the loop saves a
    checkpoint after the current step and ends); a second SIGINT (Ctrl-C twice) raises
    ``KeyboardInterrupt`` at once. ``restore`` puts the previous handlers back. Outside the main
    thread (where Python cannot set handlers) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a third one too
            raise KeyboardInterrupt
        self.signal = self.signal or signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


def train(config: Any, workdir: str, progress: bool = True, stop_at_step: int | None = None) -> dict:
    """Train until ``config.total_steps``; returns a summary with the paths a person looks at.

    ``stop_at_step`` ends the run at that step exactly as a SIGTERM would (checkpoint, clean exit),
    without changing the config; tests use it to interrupt and resume a run."""
    t = Trainer(config, workdir)
    cfg = config
    host_constants = t.constants()  # frozen inputs (LPIPS, a teacher...): their errors come first
    data_iter = data_lib.train_iterator_from_config(cfg)
    state, how = t.initial_state(data_iter)  # raises before anything is written if it cannot resume
    if jax.process_index() == 0:
        write_config(t.workdir, cfg.to_dict())
    start = int(jax.device_get(state.step))
    total = int(cfg.total_steps)
    wanted = cfg.get("compute_dtype", "float32")
    dtype = resolve_compute_dtype(wanted) + (" (auto)" if wanted == "auto" else "")
    print(f"[titok_jax] {cfg.family}:{cfg.variant} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), mesh {dict(t.mesh.shape)}, compute {dtype}: {how}; training steps {start} -> "
          f"{total}", file=sys.stderr)

    # frozen constants sharded over fsdp like params (sharding.constant_shardings)
    constants = sharding_lib.place_constants(host_constants, t.mesh)
    jitted = build_step(t.task, t.optimizer, t.shardings, t.mesh, constants=constants,
                        **step_options(cfg, t.abstract.params))
    batch_keys = tuple(t.task.batch_keys)

    stop = StopSignals()
    bar = _progress(start, total, progress)
    last_eval, grid_path, last_metrics = None, None, {}
    log_every, eval_every = int(cfg.log_every_steps), int(cfg.eval_every_steps)
    t0, steps_since = time.perf_counter(), 0
    config_dict = cfg.to_dict()
    first_bad = jnp.asarray(-1, jnp.int32)  # on device: the first step with a non-finite loss / params
    try:
        stop.install()
        step = start
        while step < total:
            batch = next(data_iter)
            inputs = data_lib.to_global_array({k: batch[k] for k in batch_keys}, t.mesh)
            if step == start:
                # The step is compiled here, ahead of its first call, on the very arguments of
                # that call: jit's cache then holds it, so the report costs no second compile.
                compiled = jitted.lower(state, inputs, constants).compile()
                try:
                    _say(f"[titok_jax] {memory.report_line(memory.compiled_report(compiled, t.parts))}")
                except Exception as e:  # noqa: BLE001 - the report is advice; the run goes on
                    _say(f"[titok_jax] no memory report of the compiled step ({type(e).__name__}: {e})")
            state, metrics = jitted(state, inputs, constants)
            first_bad = _first_bad_step(first_bad, state.step, _watched(metrics))
            step += 1
            steps_since += 1
            at_log = step % log_every == 0 or step == total
            at_eval = bool(eval_every) and (step % eval_every == 0 or step == total)
            if stop_at_step is not None and step >= stop_at_step and step < total:
                stop.signal = stop.signal or "stop_at_step"
            will_save = (t.checkpointer.manager.should_save(step) or step == total
                         or stop.signal is not None)
            if at_log or will_save or at_eval:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                bad_at = int(first_bad)
                if will_save or bad_at >= 0:  # the whole state, before anything is saved
                    _check_state(state, step, bad_at, t.checkpointer.latest_step())
                _check_finite(host, step)
                if bad_at >= 0:  # the state is finite after all (the norm overflowed): watch on
                    first_bad = jnp.asarray(-1, jnp.int32)
                if at_log:
                    elapsed = time.perf_counter() - t0
                    host["steps_per_s"] = steps_since / max(elapsed, 1e-9)
                    t0, steps_since = time.perf_counter(), 0
                    t.writer.write("metrics.jsonl", step, host, prefix="train/")
                    last_metrics = host
                    bar.set_postfix(loss=f"{host['loss']:.4f}", steps_s=f"{host['steps_per_s']:.2f}")
            bar.update(1)
            if at_eval:
                last_eval, grid_path = t.run_eval(state, step)
                _say(f"[titok_jax] step {step}: eval {eval_summary(last_eval)}")
            if stop.signal is not None:
                if not will_save:  # the signal came after the check above
                    _check_state(state, step, int(first_bad), t.checkpointer.latest_step())
                t.checkpointer.save(step, state, data_iter, config_dict, force=True)
                t.checkpointer.wait()
                _say(f"[titok_jax] stopped by signal {stop.signal} at step {step}; "
                     f"checkpoint saved, rerun the same command to resume")
                break
            if will_save:  # the policy decided above; no per-step host work otherwise
                t.checkpointer.save(step, state, data_iter, config_dict, force=step == total)
            if t.checkpointer.reached_preemption(step):
                t.checkpointer.wait()
                _say(f"[titok_jax] preempted at step {step}; checkpoint saved")
                break
    finally:
        stop.restore()
        bar.close()
        t.checkpointer.wait()
        ckpt_path = t.checkpointer.step_path()
        t.checkpointer.close()
        t.writer.close()
    final = int(jax.device_get(state.step))
    return {
        "step": final,
        "checkpoint": ckpt_path,
        "metrics": os.path.join(t.workdir, "metrics.jsonl"),
        "eval": os.path.join(t.workdir, "eval.jsonl"),
        "grid": grid_path,
        "pictures": dict(t.pictures),   # the last evaluation's: {name: path}
        "last_eval": last_eval,
        "last_metrics": last_metrics,
    }


def _say(message: str) -> None:
    """A status line on stderr from process 0 (through tqdm, so a live progress bar stays intact)."""
    if jax.process_index() == 0:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stderr)


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 10.0,
                desc="train", unit="step", file=sys.stderr)
