"""Multi-process training and evaluation with torch.distributed, launched by torchrun (not in Score SDE).

`torchrun --nproc_per_node=N main.py ...` starts N processes (ranks) with the environment variables RANK,
WORLD_SIZE and LOCAL_RANK set; `init_from_env` joins them into one process group (NCCL on CUDA, gloo on the
CPU) and gives each rank its device. A plain `python main.py` is one process: every function here is then a
no-op or the identity, and nothing from torch.distributed is touched.

What the ranks share and how (docs/workflow.md, "Multi-GPU"):
  - gradients: `all_reduce_gradients` averages them once per optimizer step, after the last micro-batch's
    backward pass (`trainer.Trainer`). Not torch's DistributedDataParallel, whose hooks assume one forward
    pass per backward pass: the score-FPE regularizer evaluates the network three times and differentiates
    it twice, and DDP's forward does not run under `torch.func.jvp` (the exact time derivative);
  - everything random that a training step draws (t, z, Hutchinson probes) is drawn for the global batch from
    a generator seeded by the step, and each rank takes its slice (`trainer.step_generator`);
  - rank 0 alone writes files (checkpoints, samples, TensorBoard, stdout.txt, evaluation results):
    `on_main_rank` runs a step there and stops every rank alike if it fails;
  - a global batch is split into contiguous shares (`share`, `check_divisible`), a sequence of evaluation work
    (batches, sampling rounds) is dealt round-robin (`is_mine`, `over_ranks`). This module owns that rank
    arithmetic: other modules ask it which part is theirs rather than slicing by rank themselves.

Restarts and dead peers (docs/workflow.md, "When a worker, a node or the launcher dies"):
  - torchrun (`--max-restarts`) restarts every worker after one dies, and the new workers meet in the store
    torchrun's agent keeps for the whole run: the keys of the previous attempt are still there (torch 2.5 and
    later share that store between attempts and prefix nothing per attempt). Gloo and NCCL then read a dead
    process's address and fail (`connectFullMesh failed ... Connection refused`) or wait for it (a hang).
    `init_from_env` therefore joins the process group under a prefix fresh for each attempt (`attempt_store`);
  - every collective waits at most the process group's timeout (`training.dist_timeout_seconds`), and a
    collective that fails because a peer died or stopped answering raises `RankLost`, naming the lost rank
    where it can be told (a rank on this host whose process is gone).
"""

import contextlib
import dataclasses
import datetime
import logging
import os
import re
import socket
import time
import uuid

import torch

_CONTEXT = None
# A gloo group beside an NCCL default group, for small host-side values (`max_over_ranks`): agreeing on them
# then neither waits for the GPU nor copies to it.
_CPU_GROUP = None
# Every rank's (host, PID) in rank order, gathered at `init_from_env`: names a lost peer in `RankLost`.
_PEERS = ()
_TIMEOUT_SECONDS = None


class RankLost(RuntimeError):
  """A collective failed because another rank died (killed, crashed) or stopped answering within the timeout."""


@dataclasses.dataclass(frozen=True)
class Context:
  """This process's place in the run: `rank` of `world_size`, and its `device`."""
  rank: int = 0
  world_size: int = 1
  local_rank: int = 0
  device: torch.device = torch.device('cpu')
  # Under torchrun's agent: the attempt's id that every rank of it shares (`attempt_store`); '' otherwise.
  attempt: str = ''

  @property
  def is_main(self):
    """Whether this process writes files and logs (rank 0)."""
    return self.rank == 0

  @property
  def distributed(self):
    return self.world_size > 1


def _env_int(name, default):
  value = os.environ.get(name)
  if value is None:
    return default
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f'The environment variable {name}={value!r} must be an integer (torchrun sets it).') from e


def init_from_env(device, timeout_seconds=None):
  """Joins the process group torchrun describes, or returns a single-process context.

  Args:
    device: `config.device`; under torchrun on CUDA each rank uses `cuda:LOCAL_RANK` instead.
    timeout_seconds: how long a collective (and joining the group) may wait for the other ranks before it fails:
      `training.dist_timeout_seconds`, validated by the caller (main.py); None keeps torch's default (30 min
      with gloo, 10 with NCCL).

  Returns:
    The `Context`; also kept for `context()`.

  Raises:
    RankLost: a rank did not join within the timeout.
  """
  global _CONTEXT, _CPU_GROUP, _PEERS, _TIMEOUT_SECONDS
  device = torch.device(device)
  attempt = ''
  world_size = _env_int('WORLD_SIZE', 1)
  if world_size <= 1:
    _CONTEXT = Context(device=device)
    return _CONTEXT
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  rank, local_rank = _env_int('RANK', 0), _env_int('LOCAL_RANK', 0)
  if device.type == 'cuda':
    if local_rank >= torch.cuda.device_count():
      raise RuntimeError(f'LOCAL_RANK={local_rank}, but only {torch.cuda.device_count()} CUDA devices are '
                         'visible: start at most one process per GPU (torchrun --nproc_per_node).')
    device = torch.device('cuda', local_rank)
    torch.cuda.set_device(device)
    backend = 'nccl'
  else:
    backend = 'gloo'
  _TIMEOUT_SECONDS = timeout_seconds
  timeout = None if timeout_seconds is None else datetime.timedelta(seconds=timeout_seconds)
  if not dist.is_initialized():
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
      store, attempt = attempt_store(rank, world_size, timeout or datetime.timedelta(minutes=30))
      dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
      dist.init_process_group(backend=backend, timeout=timeout)
  _CPU_GROUP = dist.new_group(backend='gloo', timeout=timeout) if dist.get_backend() != 'gloo' else None
  _CONTEXT = Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device, attempt=attempt)
  peers = [None] * world_size
  with _collective('joining the process group'):
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=_CPU_GROUP)
  _PEERS = tuple(peers)
  logging.info('Process group: rank %d of %d (%s, %s).', rank, world_size, backend, device)
  return _CONTEXT


def elastic_attempt():
  """`(TORCHELASTIC_RUN_ID, attempt id)` of this process under torchrun's agent, or None outside it.

  The workdir lock records it: a lock that an earlier attempt of the same torchrun run left on another host is
  stale (torchrun stops every worker of an attempt before it starts the next), which the lock cannot check
  across hosts by itself.
  """
  run_id = os.environ.get('TORCHELASTIC_RUN_ID', '')
  ctx = context()
  if not run_id or not ctx.attempt:
    return None
  return run_id, ctx.attempt


# Keys of the attempt handshake, in the agent's store (beside torch's own keys, which carry no such prefix).
ATTEMPT_KEYS = 'score_sde_fp/attempts'


def attempt_store(rank, world_size, timeout):
  """The agent's store, under a key prefix that the ranks of this attempt share and no earlier attempt used.

  Nothing in a worker's environment tells the attempts apart on every node (TORCHELASTIC_RESTART_COUNT counts
  each agent's own restarts), so rank 0 names the attempt with a fresh random id and hands it to each rank in
  reply to a fresh random id of that rank: a reply can only come from this attempt's rank 0 (torchrun stops
  every worker of an attempt before it starts the next). Rank 0 replies until every rank has confirmed.

  Returns:
    `(store, attempt)`: the prefixed store and the attempt's id.

  Raises:
    RankLost: not every rank joined (or rank 0 did not answer) within `timeout`.
  """
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                        timeout=timeout)
  nonce = uuid.uuid4().hex
  deadline = time.monotonic() + timeout.total_seconds()
  if rank != 0:
    store.queue_push(f'{ATTEMPT_KEYS}/hello', nonce)
    try:
      attempt = store.get(f'{ATTEMPT_KEYS}/reply/{nonce}').decode()
    except dist.DistError as e:
      raise RankLost(f'Rank 0 did not start within {timeout.total_seconds():g} s (training.dist_timeout_seconds) '
                     f'to join this attempt ({_first_line(e)}).') from e
    store.add(f'{ATTEMPT_KEYS}/{attempt}/joined', 1)
  else:
    attempt = nonce
    while store.add(f'{ATTEMPT_KEYS}/{attempt}/joined', 0) < world_size - 1:
      # Replies to hellos of earlier attempts too: nobody waits for those, and they cannot be told apart.
      while store.queue_len(f'{ATTEMPT_KEYS}/hello'):
        store.set(f'{ATTEMPT_KEYS}/reply/{store.queue_pop(f"{ATTEMPT_KEYS}/hello").decode()}', attempt)
      if time.monotonic() > deadline:
        joined = store.add(f'{ATTEMPT_KEYS}/{attempt}/joined', 0)
        raise RankLost(f'Only {joined} of the {world_size - 1} other ranks joined within '
                       f'{timeout.total_seconds():g} s (training.dist_timeout_seconds).')
      time.sleep(0.05)
  return dist.PrefixStore(f'{ATTEMPT_KEYS}/{attempt}/', store), attempt


def _first_line(error):
  """The backend error's first sentence, without gloo's source location (`[.../pair.cc:561] `)."""
  text = str(error).strip()
  if not text:
    return type(error).__name__
  return re.sub(r'^\[[^\]]*\]\s*', '', text.splitlines()[0]).split('. ')[0].rstrip('.')


def _process_gone(pid):
  """Whether process `pid` of this host has ended (no such process, or a zombie its parent has not reaped)."""
  try:
    with open(f'/proc/{pid}/stat', 'rb') as f:
      stat = f.read()
  except FileNotFoundError:
    return True
  except OSError:
    return False
  return stat[stat.rindex(b')') + 2:][:1] in (b'Z', b'X')


def _lost_peers(peers, wait_seconds=2.):
  """The ranks on this host whose process has ended (waiting up to `wait_seconds` for a dying one to end)."""
  host = socket.gethostname()
  local = [(r, pid) for r, (h, pid) in enumerate(peers) if h == host and pid != os.getpid()]
  deadline = time.monotonic() + wait_seconds
  while True:
    gone = [(r, pid) for r, pid in local if _process_gone(pid)]
    if gone or time.monotonic() > deadline:
      return gone
    time.sleep(0.1)


def lost_rank_message(what, error, peers=None):
  """The one-line `RankLost` message for collective `what` that failed with the backend's `error`.

  Args:
    what: the collective, as the message names it (e.g. 'the gradient all_reduce').
    error: the backend's exception.
    peers: every rank's (host, PID), in rank order; default: those gathered by `init_from_env`.
  """
  peers = _PEERS if peers is None else peers
  reason = _first_line(error)
  gone = _lost_peers(peers) if peers else []
  if gone:
    who = ', '.join(f'rank {r} (PID {pid} on host {socket.gethostname()})' for r, pid in gone)
    cause = f'{who} ended (killed or crashed)'
  elif 'timed out' in reason.lower() or 'timeout' in reason.lower():
    cause = (f'a rank did not answer within {_TIMEOUT_SECONDS:g} s (training.dist_timeout_seconds): it hangs, or '
             'its host is unreachable' if _TIMEOUT_SECONDS else 'a rank did not answer within the timeout')
  else:
    hosts = sorted({h for h, _ in peers} - {socket.gethostname()})
    cause = 'a peer rank ended or its host is unreachable' + (
        f' (ranks on {", ".join(hosts)} cannot be checked from here)' if hosts else '')
  return (f'{what} failed on rank {context().rank}: {cause}. Every rank stops; under torchrun --max-restarts all '
          f'restart from the resume point. Backend: {reason}')


_TRANSPORT_WORDS = re.compile(r'connection|read error|write error|timed out|timeout|broken pipe|peer|socket',
                              re.IGNORECASE)


@contextlib.contextmanager
def _collective(what):
  """Turns the backend's error of a collective that lost a peer into `RankLost` (one line naming the peer)."""
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  try:
    yield
  except RuntimeError as e:
    # Gloo reports a lost connection as a plain RuntimeError: tell it from a misuse (e.g. mismatched shapes) by
    # the transport words in its message.
    if isinstance(e, dist.DistError) or _TRANSPORT_WORDS.search(str(e)):
      raise RankLost(lost_rank_message(what, e)) from e
    raise


def context():
  """The current `Context` (a single CPU process before `init_from_env`)."""
  return _CONTEXT if _CONTEXT is not None else Context()


def shutdown():
  """Leaves the process group (if any) and forgets the context."""
  global _CONTEXT, _CPU_GROUP, _PEERS
  _CPU_GROUP, _PEERS = None, ()
  if _CONTEXT is not None and _CONTEXT.distributed:
    import torch.distributed as dist  # pylint: disable=g-import-not-at-top
    if dist.is_initialized():
      dist.destroy_process_group()
  _CONTEXT = None


def barrier():
  """Waits for every rank (no-op in one process)."""
  if context().distributed:
    import torch.distributed as dist  # pylint: disable=g-import-not-at-top
    with _collective('barrier'):
      dist.barrier()


def _all_reduce(tensor, op):
  if not context().distributed:
    return tensor
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  out = tensor.detach().clone()
  with _collective(f'all_reduce ({op.lower()})'):
    dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
  return out


def all_reduce_sum(tensor):
  """The sum of `tensor` over ranks (a new tensor; `tensor` itself in one process)."""
  return _all_reduce(tensor, 'SUM')


def all_reduce_min(tensor):
  """The elementwise minimum of `tensor` over ranks (`tensor` itself in one process)."""
  return _all_reduce(tensor, 'MIN')


def max_over_ranks(value):
  """The maximum over ranks of a Python int, computed on the host (gloo): no GPU sync (`value` in one process).

  Every rank must call it at the same point; e.g. to agree, at a step boundary, whether any rank received a
  stop signal.
  """
  if not context().distributed:
    return value
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  box = torch.tensor([int(value)], dtype=torch.long)
  with _collective('the step-boundary agreement (max_over_ranks)'):
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_CPU_GROUP)
  return int(box.item())


# Gradients are averaged in flat buckets of at most this many elements: one collective per bucket rather than
# per parameter, without a second copy of all gradients at once.
_BUCKET_NUMEL = 2 ** 24


def _buckets(params):
  bucket, size = [], 0
  for p in params:
    if bucket and size + p.numel() > _BUCKET_NUMEL:
      yield bucket
      bucket, size = [], 0
    bucket.append(p)
    size += p.numel()
  if bucket:
    yield bucket


def all_reduce_gradients(parameters):
  """Averages the `.grad` of `parameters` over ranks, in place (no-op in one process).

  Every rank must call it with the same parameters in the same order; a parameter without a gradient counts
  as zero (so ranks stay in step even if one of them did not use it).
  """
  ctx = context()
  if not ctx.distributed:
    return
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  params = [p for p in parameters if p.requires_grad]
  for p in params:
    if p.grad is None:
      p.grad = torch.zeros_like(p)
  for bucket in _buckets(params):
    flat = torch.cat([p.grad.reshape(-1) for p in bucket])
    with _collective('the gradient all_reduce'):
      dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for p in bucket:
      p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
      offset += p.numel()


def gather_objects(obj):
  """Every rank's `obj` (picklable), as a list in rank order, on rank 0; `None` on the other ranks."""
  ctx = context()
  if not ctx.distributed:
    return [obj]
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  out = [None] * ctx.world_size if ctx.is_main else None
  with _collective('gather_objects (results of a wave of work)'):
    dist.gather_object(obj, out, dst=0)
  return out


def broadcast_object(obj):
  """Rank 0's `obj` on every rank."""
  if not context().distributed:
    return obj
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  box = [obj]
  with _collective('broadcast_object (rank 0\'s outcome)'):
    dist.broadcast_object_list(box, src=0)
  return box[0]


# ------------------------------------------------------------------------------------------------------------
# Rank arithmetic: which part of a global batch, and which items of a sequence of work, are this rank's. Every
# other module asks these functions rather than computing with `rank` and `world_size` itself.
# ------------------------------------------------------------------------------------------------------------

_PROCESSES = 'processes (torchrun --nproc_per_node)'


def check_divisible(field, value, parts, why, what=_PROCESSES):
  """Checks that `config.<field>` splits evenly into `parts` and returns the size of one part.

  The one check of a size split over ranks. A split over ranks and then micro-batches passes their product as
  `parts` and says so in `what`, e.g. `parts=world_size * k`,
  `what=f'parts ({world_size} processes x config.training.grad_accum_steps={k} micro-batches)'`.

  Args:
    field: the config field, without `config.` (e.g. 'training.batch_size').
    value: its value (an int).
    parts: into how many equal parts it is split (an int >= 1).
    why: why it must split evenly (a clause, for the error message).
    what: what the parts are (follows the number in the error message): processes by default.

  Returns:
    value // parts.

  Raises:
    ValueError: naming the field, its value, the number of parts and `why`, if `value % parts`.
  """
  if value % parts:
    raise ValueError(f'config.{field}={value} does not divide over {parts} {what}: {why}.')
  return value // parts


def share(n, ctx=None, field='training.batch_size'):
  """This rank's contiguous share of `n` items (e.g. the samples of a global batch): a `slice`.

  Rank r of world_size takes items r * n / world_size up to (r + 1) * n / world_size, so the shares of the
  ranks, in rank order, tile 0..n once: concatenated, they are what a single process takes.

  Args:
    n: the number of items; must divide by the number of processes.
    ctx: the `Context` (default: `context()`).
    field: the config field `n` comes from, named in the error if it does not divide (the global training
      batch by default).

  Raises:
    ValueError: from `check_divisible`, if `n` does not divide over the processes.
  """
  ctx = ctx or context()
  local = check_divisible(field, n, ctx.world_size, 'the batch size is the global one, split evenly over the ranks')
  return slice(ctx.rank * local, (ctx.rank + 1) * local)


def is_mine(index, ctx=None):
  """Whether this rank does work item `index` of a sequence dealt round-robin (item i to rank i % world_size).

  Args:
    index: the item's index (0, 1, 2, ...), the same on every rank.
    ctx: the `Context` (default: `context()`).
  """
  ctx = ctx or context()
  return index % ctx.world_size == ctx.rank


def over_ranks(items, fn, ctx=None):
  """Applies `fn` to the items of an ordered sequence of work, each rank to its share, in waves.

  Every rank iterates `items` alike: pairs `(index, item)` with indices 0, 1, 2, ... Rank r computes
  `fn(index, item)` for the indices `is_mine` gives it (index % world_size == r; the others' items may be
  None: not converted); after each wave of world_size items the results are gathered to rank 0.

  Args:
    items: an iterable of `(index, item)` pairs, indices consecutive from 0.
    fn: `fn(index, item)` -> a picklable result.
    ctx: the `Context` (default: `context()`); a simulated one (in one process) only changes which items are
      this rank's: the gather of one process is the identity.

  Yields:
    On rank 0, `(index, result)` for every item, in index order (one wave at a time, so results can be
    written as they come); nothing on the other ranks. In one process: every item of this rank, one at a time.
  """
  ctx = ctx or context()
  mine = []
  count = 0
  for index, item in items:
    count = index + 1
    if is_mine(index, ctx):
      mine.append((index, fn(index, item)))
    if count % ctx.world_size == 0:
      yield from _gathered(mine)
      mine = []
  if count % ctx.world_size:
    yield from _gathered(mine)


def _gathered(mine):
  """Every rank's `(index, result)` pairs of a wave, on rank 0, in index order (nothing on the other ranks)."""
  gathered = gather_objects(mine)
  if gathered is None:
    return
  yield from sorted((pair for rank_pairs in gathered for pair in rank_pairs), key=lambda pair: pair[0])


def on_main_rank(fn):
  """Runs `fn` on rank 0 alone; an exception there is raised on every rank (itself on rank 0, a RuntimeError
  quoting it on the others), so that all ranks stop alike.

  Every rank must call it at the same point (it broadcasts rank 0's outcome).

  Returns:
    What `fn` returned, on rank 0; None on the other ranks.
  """
  result, error = None, None
  if context().is_main:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  (re-raised below, on every rank)
      error = e
  message = broadcast_object(None if error is None else f'{type(error).__name__}: {error}')
  if error is not None:
    raise error
  if message is not None:
    raise RuntimeError(f'Rank 0 stopped: {message}')
  return result


def mean_over_ranks(terms):
  """The mean over ranks of a dict of 0-dim tensors (one collective; the identity in one process).

  Returns:
    A dict with the keys of `terms`: float32 tensors on every rank; `terms` itself in one process.
  """
  ctx = context()
  if not ctx.distributed:
    return terms
  names = list(terms)
  summed = all_reduce_sum(torch.stack([terms[name].float() for name in names]))
  return {name: summed[i] / ctx.world_size for i, name in enumerate(names)}
