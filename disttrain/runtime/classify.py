"""What every classifier-training stage shares: moving batches to the device in the run's
memory format, and top-1 accuracy on a labelled evaluation set (and on the EMA weights).
Damaged images of the evaluation set are skipped and counted (`eval/damaged_samples`); more
than `max_bad_fraction` of them is a DataError."""

from __future__ import annotations

from typing import Any

import torch

from disttrain.data.sources import EvalSource
from disttrain.data.stream import check_damage
from disttrain.data.transforms import eval_transform
from disttrain.runtime.run import Run


class ClassifierEval:
    def __init__(self, run: Run, test_set: EvalSource, *, image_size: int, resize_size: int, batch_size: int,
                 num_workers: int, channels_last: bool, max_bad_fraction: float = 1.0):
        self.run = run
        self.test_set = test_set
        self.max_bad_fraction = max_bad_fraction
        self.damaged = 0  # damaged images skipped by the latest pass, over all ranks
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.loader = test_set.loader(eval_transform(image_size, resize_size), batch_size=batch_size,
                                      rank=run.rank, world_size=run.world_size, num_workers=num_workers)
        self.most_batches = test_set.most_batches(batch_size, run.world_size, num_workers)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.run.device, memory_format=self.memory_format, non_blocking=True)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.to(self.run.device, non_blocking=True)

    def accuracy(self, net: torch.nn.Module) -> float:
        """Top-1 accuracy over the whole evaluation set, summed over ranks."""
        def correct(batch: tuple) -> torch.Tensor:
            labels = self.labels(batch[1])
            return torch.stack([(net(self.images(batch[0])).argmax(1) == labels).sum(), labels.new_tensor(len(labels))])

        counts = self.run.eval_batches(self.loader, self.most_batches, correct)
        total = torch.stack(counts).sum(0) if counts else torch.zeros(2, dtype=torch.long, device=self.run.device)
        problems = self.test_set.problems()
        total = torch.cat([total, total.new_tensor([problems["served_samples"], problems["corrupt_samples"],
                                                    problems["unreadable_samples"]])])
        hits, seen, served, corrupt, unreadable = self.run.accelerator.reduce(total, reduction="sum").tolist()
        self.damaged = int(corrupt + unreadable)
        check_damage({"served_samples": served, "corrupt_samples": corrupt, "unreadable_samples": unreadable},
                     self.max_bad_fraction, self.test_set.spec)
        return hits / max(seen, 1)

    def metrics(self, model: torch.nn.Module, ema: Any = None) -> dict[str, float]:
        """eval/acc1 (and eval/acc1_ema): the loop's eval_fn."""
        out = {"eval/acc1": self.accuracy(self.run.eval_model(model))}
        out["eval/damaged_samples"] = float(self.damaged)
        if ema is not None:
            out["eval/acc1_ema"] = self.accuracy(ema.module)
        return out
