"""The training data loader: a ``paddle.io.DataLoader`` that cannot crash a worker or hang the run.

Loader workers receive numpy arrays from the collate function, never ``paddle.Tensor`` s: Paddle
sends a worker's tensors by borrowed reference and may pickle them after they were freed, which
killed multi-process runs at random with a worker segmentation fault (see ``_GuardedCollate``).

Paddle's own loader can also turn a data error into a hang or into a different error:

* with ``num_workers=0`` its prefetch thread dies on an exception from the dataset or the
  collate function without closing the queue the training loop reads, so the loop waits
  forever after the traceback is printed;
* with workers, the training loop gets ``SystemError: Blocking queue is killed``, while the
  real error is only in an earlier log line;
* a stream that yields no batch ends the epoch silently, and PaddleNLP's Trainer then fails
  with an unrelated ``UnboundLocalError``.

:class:`TrainDataLoader` keeps Paddle's sampling, batching and worker processes, and makes
all three an exception in the training loop that carries the original message: the main
process prefetches in its own thread that hands exceptions over, a worker's exception
travels back as a value in the batch, and an epoch that produced no batch raises
:class:`EmptyTrainingDataError` naming the source and its skip counts.
"""
from __future__ import annotations

import logging
import pickle
import queue
import threading
import traceback
from typing import Any, Callable, Iterator, Optional

import numpy as np
import paddle.io

from ..errors import PaddleMIXError

__all__ = ["EmptyTrainingDataError", "LoaderWorkerError", "TrainDataLoader"]

logger = logging.getLogger(__name__)

_FAILURE_KEY = "__paddlemix_loader_failure__"


class EmptyTrainingDataError(PaddleMIXError, RuntimeError):
    """An epoch of the training data produced no batch."""


class LoaderWorkerError(PaddleMIXError, RuntimeError):
    """A loader worker's exception that could not be sent to the training process as itself."""


class _Failure:
    """An exception raised while loading, carried to the training loop inside a batch.

    Paddle's worker loop replaces an exception by a generic one in the loader thread; a value
    passes through its queues untouched (the collate output's non-array fields are pickled).
    """

    def __init__(self, error: BaseException):
        self.text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        try:
            pickle.dumps(error)
        except Exception:  # noqa: BLE001 - anything unpicklable would be lost in the worker's queue
            error = LoaderWorkerError(f"{type(error).__name__}: {error}")
        self.error = error

    def raise_here(self, where: str):
        self.error.add_note(f"raised in the {where}:\n{self.text}")
        raise self.error


class _GuardedDataset(paddle.io.Dataset):
    """Returns a :class:`_Failure` instead of raising, so the collate function can carry it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except Exception as e:  # noqa: BLE001 - every failure must reach the training loop
            return _Failure(e)


class _GuardedStream(paddle.io.IterableDataset):
    """An iterable dataset whose exception becomes :class:`_Failure` items.

    Repeated, so that the batch being filled is full (Paddle drops a short last batch with
    ``drop_last``); the training loop raises at the first one.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        try:
            yield from self.dataset
        except Exception as e:  # noqa: BLE001 - every failure must reach the training loop
            failure = _Failure(e)
            while True:
                yield failure


def _map_arrays(batch, fn):
    if isinstance(batch, dict):
        return {k: _map_arrays(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_arrays(v, fn) for v in batch)
    return fn(batch)


def _tensor_to_array(x):
    return x.numpy() if isinstance(x, paddle.Tensor) else x


def _array_to_tensor(x):
    return paddle.to_tensor(x) if isinstance(x, np.ndarray) else x


class _GuardedCollate:
    """The collate function as it runs in a worker: failures become values, tensors become arrays.

    Paddle's worker hands a collated ``paddle.Tensor`` to its queue as a borrowed reference
    (``Tensor.get_tensor()``), and the queue pickles it later, in a feeder thread. When the worker
    collates the next batch first, the tensor is already freed: the feeder reads freed memory and
    the worker dies with a segmentation fault, or the shared-memory file it names is gone when
    the trainer opens it. Which thread wins depends on scheduling, so multi-process runs on busy
    CPUs crashed at random. Arrays are copied into tensors the worker owns; tensors are made in the
    training process.
    """

    def __init__(self, collate_fn: Callable[[list], Any]):
        self.collate_fn = collate_fn

    def __call__(self, samples):
        failure = next((s for s in samples if isinstance(s, _Failure)), None)
        if failure is None:
            try:
                return _map_arrays(self.collate_fn(samples), _tensor_to_array)
            except Exception as e:  # noqa: BLE001 - every failure must reach the training loop
                failure = _Failure(e)
        # An array keeps the batch a valid input of Paddle's tensor queue.
        return {_FAILURE_KEY: failure, "placeholder": np.zeros([1], dtype="float32")}


def _raise_if_failure(batch, where: str):
    if isinstance(batch, dict) and _FAILURE_KEY in batch:
        batch[_FAILURE_KEY].raise_here(where)
    return batch


class TrainDataLoader(paddle.io.DataLoader):
    """``paddle.io.DataLoader`` for training where every data failure is raised in the training loop.

    Arguments are ``paddle.io.DataLoader`` 's, plus ``name`` (shown in errors) and ``skips`` (the
    dataset's ``SkipCounter``, summarised when an epoch is empty). ``collate_fn`` is required.
    """

    def __init__(self, dataset, *args, collate_fn: Callable[[list], Any], name: Optional[str] = None,
                 skips: Any = None, prefetch_batches: int = 2, **kwargs):
        guarded = _GuardedStream(dataset) if isinstance(dataset, paddle.io.IterableDataset) else _GuardedDataset(dataset)
        super().__init__(guarded, *args, collate_fn=_GuardedCollate(collate_fn), **kwargs)
        self.source = dataset
        self.source_collate_fn = collate_fn
        self.name = name or getattr(dataset, "name", type(dataset).__name__)
        self.skips = skips if skips is not None else getattr(dataset, "skips", None)
        self.prefetch_batches = max(1, int(prefetch_batches))

    def _batches(self) -> Iterator[Any]:
        if self.num_workers > 0:
            for batch in super().__iter__():
                yield _raise_if_failure(batch, "data loader worker")
            return
        # In-process loading: Paddle's thread would hang the loop on an exception (see the module).
        for batch in _prefetched(self._fetch_in_process(), self.prefetch_batches, self.name):
            yield _map_arrays(batch, _array_to_tensor)

    def _fetch_in_process(self) -> Iterator[Any]:
        dataset, collate = self.source, self.source_collate_fn
        if isinstance(dataset, paddle.io.IterableDataset):
            batch = []
            for sample in dataset:
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield collate(batch)
                    batch = []
            if batch and not self.drop_last:
                yield collate(batch)
            return
        for indices in self.batch_sampler:
            yield collate([dataset[i] for i in indices])

    def __iter__(self) -> Iterator[Any]:
        produced = 0
        for batch in self._batches():
            produced += 1
            yield batch
        if produced == 0:
            counts = self.skips.summary() if hasattr(self.skips, "summary") else "no skip counts"
            raise EmptyTrainingDataError(
                f"the training data {self.name} produced no batch of {self.batch_size or 'the sampler'} "
                f"samples in this epoch ({counts}). Check the data path and format; a stream needs at least "
                f"one full batch per rank and loader worker."
            )


_END = object()


def _prefetched(batches: Iterator[Any], depth: int, name: str) -> Iterator[Any]:
    """``batches`` produced by a thread up to ``depth`` ahead; its exception is raised here."""
    ready: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in batches:
                if not put(batch):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the training loop, which raises it
            put(e)
            return
        put(_END)

    thread = threading.Thread(target=produce, name=f"prefetch {name}", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
