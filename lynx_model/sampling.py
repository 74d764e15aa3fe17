"""Checkpoints of the denoising loop: stop a generation after step k, resume it later, same latents.

A ``SamplingCheckpoint`` holds everything the rest of the loop depends on:

- the latents after ``steps_done`` of ``total_steps`` steps;
- the schedule, ``timesteps`` and ``sigmas``, checked against the one the resuming call sets;
- the memory of diffusers' ``UniPCMultistepScheduler`` (``SolverState``): the last ``solver_order``
  converted model outputs and their timesteps (the multistep predictor's history), the sample
  before the last predictor step and the order that step used (the next step's corrector needs
  both), and the warm-up counter ``lower_order_nums``. The step index is ``steps_done``;
- the seed and a ``conditions`` record (guidance scales, weight fingerprints, a digest of the
  conditioning tensors, the scheduler's settings): a checkpoint of another generation is refused
  with ``CheckpointMismatchError`` instead of being continued into a wrong video.

UniPC draws no noise, so once the latents and the solver memory are back nothing random is left to
replay: on the same device and dtype a resumed generation gives the uninterrupted one's latents bit
for bit (tested in fp32 on the CPU). A checkpoint is one safetensors file: the tensors in their own
dtypes, everything else as JSON in the header (``lynx_kind`` ``sampling_checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import UniPCMultistepScheduler
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointMismatchError, ModelInputError

FORMAT_VERSION = 1
# Conditions recorded as digests of tensors, and what a mismatch means.
_DIGESTS = {
    "initial_noise": "other initial noise (seed, generator or latents)",
    "inputs": "other prompt, negative prompt, identity or reference inputs",
}
# Scheduler settings that change what a step computes; a checkpoint made under others is refused.
_SCHEDULER_SETTINGS = (
    "solver_order",
    "solver_type",
    "predict_x0",
    "lower_order_final",
    "disable_corrector",
    "prediction_type",
    "thresholding",
    "use_flow_sigmas",
    "flow_shift",
    "final_sigmas_type",
    "num_train_timesteps",
)


def tensor_digest(tensors: Iterable[torch.Tensor | None]) -> str:
    """sha256 of the tensors' shapes, dtypes and bytes (None counts as a marker): identifies inputs."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none;")
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{str(flat.dtype)}{list(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def scheduler_settings(scheduler: Any) -> dict[str, Any]:
    """The scheduler's class and the settings of it that a checkpoint depends on (JSON-able)."""
    config = scheduler.config
    settings: dict[str, Any] = {"class": type(scheduler).__name__}
    for name in _SCHEDULER_SETTINGS:
        value = config.get(name)
        settings[name] = list(value) if isinstance(value, (list, tuple)) else value
    return settings


def _require_unipc(scheduler: Any) -> UniPCMultistepScheduler:
    if not isinstance(scheduler, UniPCMultistepScheduler):
        raise ModelInputError(
            "sampling checkpoints need the UniPCMultistepScheduler, this pipeline runs "
            f"{type(scheduler).__name__}"
        )
    if scheduler.solver_p is not None:  # a second solver with a state of its own
        raise ModelInputError("sampling checkpoints do not cover a UniPC scheduler with a solver_p")
    return scheduler


def _cpu_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # a copy, not a view: the loop goes on while a writer thread serialises this
    return None if tensor is None else tensor.detach().to("cpu", copy=True)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass
class SolverState:
    """What ``UniPCMultistepScheduler.step`` reads from earlier steps (see the module docstring)."""

    model_outputs: list[torch.Tensor | None]
    timestep_list: list[int | None]
    lower_order_nums: int
    this_order: int | None
    last_sample: torch.Tensor | None

    @classmethod
    def capture(cls, scheduler: Any) -> SolverState:
        scheduler = _require_unipc(scheduler)
        return cls(
            model_outputs=[_cpu_copy(output) for output in scheduler.model_outputs],
            timestep_list=[_int_or_none(t) for t in scheduler.timestep_list],
            lower_order_nums=int(scheduler.lower_order_nums),
            this_order=_int_or_none(getattr(scheduler, "this_order", None)),
            last_sample=_cpu_copy(scheduler.last_sample),
        )

    def restore(self, scheduler: Any, steps_done: int) -> None:
        """Put the state back into a scheduler whose ``set_timesteps`` already ran; the next
        ``step`` call then runs step ``steps_done`` (through ``set_begin_index``)."""
        scheduler = _require_unipc(scheduler)
        order = scheduler.config.solver_order
        if len(self.model_outputs) != order or len(self.timestep_list) != order:
            raise CheckpointMismatchError(
                f"sampling checkpoint holds a solver of order {len(self.model_outputs)}, "
                f"the scheduler has {order}"
            )
        device = scheduler.timesteps.device
        scheduler.model_outputs = [None if t is None else t.to(device) for t in self.model_outputs]
        scheduler.timestep_list = [
            None if t is None else torch.tensor(t, dtype=scheduler.timesteps.dtype, device=device)
            for t in self.timestep_list
        ]
        scheduler.lower_order_nums = self.lower_order_nums
        scheduler.last_sample = None if self.last_sample is None else self.last_sample.to(device)
        if self.this_order is not None:
            scheduler.this_order = self.this_order
        scheduler.set_begin_index(steps_done)


@dataclass
class SamplingCheckpoint:
    """The denoising loop after ``steps_done`` of ``total_steps`` steps (see the module docstring)."""

    KIND: ClassVar[str] = "sampling_checkpoint"
    latents: torch.Tensor
    steps_done: int
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    seed: int
    solver: SolverState
    conditions: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.total_steps

    @classmethod
    def capture(
        cls,
        scheduler: Any,
        latents: torch.Tensor,
        steps_done: int,
        seed: int,
        conditions: Mapping[str, Any] | None = None,
    ) -> SamplingCheckpoint:
        """The loop's state right after step ``steps_done - 1`` (CPU copies of every tensor)."""
        return cls(
            latents=_cpu_copy(latents),
            steps_done=steps_done,
            timesteps=_cpu_copy(scheduler.timesteps),
            sigmas=_cpu_copy(scheduler.sigmas),
            seed=seed,
            solver=SolverState.capture(scheduler),
            conditions=dict(conditions or {}),
        )

    # --- checking and resuming -----------------------------------------------------------------
    def check(self, *, shape: Iterable[int], seed: int, conditions: Mapping[str, Any]) -> None:
        """Refuse (``CheckpointMismatchError``, one line) a checkpoint of another generation."""
        shape = list(shape)
        if list(self.latents.shape) != shape:
            raise CheckpointMismatchError(
                f"sampling checkpoint has latents of shape {list(self.latents.shape)}, "
                f"this generation {shape}"
            )
        if self.seed != seed:
            raise CheckpointMismatchError(
                f"sampling checkpoint was made with seed {self.seed}, this call uses {seed}"
            )
        for name in sorted(set(self.conditions) | set(conditions)):
            mine, theirs = self.conditions.get(name), conditions.get(name)
            if _canonical(mine) == _canonical(theirs):
                continue
            if name in _DIGESTS:
                raise CheckpointMismatchError(
                    f"sampling checkpoint was made from {_DIGESTS[name]} than this call"
                )
            raise CheckpointMismatchError(
                f"sampling checkpoint was made with {name}={_shown(mine)}, this call has {_shown(theirs)}"
            )

    def restore(self, scheduler: Any) -> int:
        """Restore the solver after ``set_timesteps``; returns the index of the next step to run."""
        if not 0 <= self.steps_done <= self.total_steps:
            raise CheckpointMismatchError(
                f"sampling checkpoint claims {self.steps_done} of {self.total_steps} steps done"
            )
        timesteps = scheduler.timesteps.detach().to("cpu")
        if timesteps.numel() != self.total_steps:
            raise CheckpointMismatchError(
                f"sampling checkpoint is of a {self.total_steps}-step schedule, this generation runs "
                f"{timesteps.numel()} steps"
            )
        same_schedule = torch.equal(timesteps.to(self.timesteps.dtype), self.timesteps) and torch.equal(
            scheduler.sigmas.detach().to("cpu", self.sigmas.dtype), self.sigmas
        )
        if not same_schedule:
            raise CheckpointMismatchError(
                "sampling checkpoint was made with other timesteps or sigmas than this generation's "
                f"{self.total_steps}-step schedule"
            )
        self.solver.restore(scheduler, self.steps_done)
        return self.steps_done

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"latents": self.latents, "timesteps": self.timesteps, "sigmas": self.sigmas}
        if self.solver.last_sample is not None:
            tensors["last_sample"] = self.solver.last_sample
        for index, output in enumerate(self.solver.model_outputs):
            if output is not None:
                tensors[f"model_outputs.{index}"] = output
        meta = {
            "format": FORMAT_VERSION,
            "steps_done": self.steps_done,
            "seed": self.seed,
            "model_outputs": len(self.solver.model_outputs),
            "timestep_list": self.solver.timestep_list,
            "lower_order_nums": self.solver.lower_order_nums,
            "this_order": self.solver.this_order,
            "conditions": self.conditions,
        }
        tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
        save_file(tensors, str(path), metadata={"lynx_kind": self.KIND, "lynx_meta": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> SamplingCheckpoint:
        """Read a checkpoint file (on the CPU); ``ModelInputError`` naming the file if it is not one."""
        path = Path(path)
        if not path.is_file():
            raise ModelInputError(f"sampling checkpoint not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # safetensors raises several kinds for damaged files
            raise ModelInputError(f"{path} is not a readable sampling checkpoint: {err}") from err
        if metadata.get("lynx_kind") != cls.KIND:
            raise ModelInputError(
                f"{path} holds {metadata.get('lynx_kind') or 'unknown data'}, not {cls.KIND}"
            )
        try:
            meta = json.loads(metadata["lynx_meta"])
            if meta.get("format") != FORMAT_VERSION:
                raise ModelInputError(
                    f"{path} is a sampling checkpoint of format {meta.get('format')}, this version reads "
                    f"{FORMAT_VERSION}"
                )
            solver = SolverState(
                model_outputs=[tensors.get(f"model_outputs.{i}") for i in range(int(meta["model_outputs"]))],
                timestep_list=[_int_or_none(t) for t in meta["timestep_list"]],
                lower_order_nums=int(meta["lower_order_nums"]),
                this_order=_int_or_none(meta["this_order"]),
                last_sample=tensors.get("last_sample"),
            )
            return cls(
                latents=tensors["latents"],
                steps_done=int(meta["steps_done"]),
                timesteps=tensors["timesteps"],
                sigmas=tensors["sigmas"],
                seed=int(meta["seed"]),
                solver=solver,
                conditions=dict(meta.get("conditions") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelInputError(
                f"{path} is an incomplete sampling checkpoint: missing or bad {err}"
            ) from None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _shown(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= 80 else text[:77] + "..."
