"""Progress bars of a run: a callback plugin that draws a task bar and a step bar with rich."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .data.task import Task
    from .learner import ContinualLearner
    from .results import RunResults

__all__ = ["RichProgress", "LOSS_EVERY"]

# The learner itself reads the loss at step 1 and every 10 steps to log it, so reading it at the
# same steps adds no extra wait for the device.
LOSS_EVERY = 10


class RichProgress:
    """Draws ``Tasks done/total`` and ``Steps done/budget`` bars while a learner runs.

    Register it as a callback: ``ContinualLearner(..., callbacks=[RichProgress(console)])``. With
    ``enabled=False`` (the default when ``console`` is not a terminal) every hook returns at once
    and nothing is drawn. Logs printed through the same console appear above the bars.
    """

    def __init__(self, console: Console | None = None, enabled: bool | None = None) -> None:
        self.console = console if console is not None else Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.progress: Progress | None = None
        self.task_bar: TaskID | None = None
        self.step_bar: TaskID | None = None
        self.task_name = ""
        self.phase = ""

    def start(self, learner: ContinualLearner) -> None:
        """Create and show both bars unless they are shown already; ``igsp_before_task`` calls this."""
        if self.progress is not None or not self.enabled:
            return
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task_bar = self.progress.add_task("Tasks", total=learner.num_tasks, status="")
        self.step_bar = self.progress.add_task("Steps", total=max(learner.settings.train.steps, 1), status="")

    def close(self) -> None:
        """Remove the step bar and stop drawing, leaving the task bar on screen. Safe to call twice."""
        if self.progress is None:
            return
        if self.step_bar is not None:
            self.progress.remove_task(self.step_bar)
        self.progress.stop()
        self.progress = None

    def _describe_step_bar(self) -> str:
        return f"{self.task_name} ({self.phase})" if self.phase else self.task_name

    @hookimpl
    def igsp_before_task(self, learner: ContinualLearner, task: Task, task_index: int) -> None:
        self.start(learner)
        if self.progress is None:
            return
        self.task_name, self.phase = task.name, ""
        budget = learner.settings.train.steps
        self.progress.update(self.task_bar, completed=task_index)
        self.progress.reset(
            self.step_bar, total=max(budget, 1), description=self._describe_step_bar(), status="", visible=budget > 0
        )

    @hookimpl
    def igsp_after_step(self, losses: dict[str, Any], phase: str, step: int) -> None:
        if self.progress is None:
            return
        if phase != self.phase:
            self.phase = phase
            self.progress.update(self.step_bar, description=self._describe_step_bar())
        if step == 1 or step % LOSS_EVERY == 0:
            self.progress.update(self.step_bar, completed=step, status=f"loss {float(losses['loss']):.4f}")
            self.progress.refresh()
        else:
            self.progress.update(self.step_bar, completed=step)

    @hookimpl
    def igsp_after_phase(self, learner: ContinualLearner, phase: str) -> None:
        if self.progress is None:
            return
        self.progress.update(self.step_bar, completed=learner.task_step)

    @hookimpl
    def igsp_after_eval(self, task_index: int, accuracies: dict[str, float]) -> None:
        if self.progress is None:
            return
        mean = sum(accuracies.values()) / len(accuracies) if accuracies else float("nan")
        self.progress.update(self.task_bar, completed=task_index + 1, status=f"row mean {mean:.1f}%")
        self.progress.refresh()

    @hookimpl
    def igsp_after_run(self, results: RunResults) -> None:
        self.close()
