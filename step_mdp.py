"""The step-level MDP (StepPO, arXiv 2604.18401, 'step-level MDP'): records and batching.

An agent's action is one whole model response of one turn. A `Step` keeps the exact token context the
policy saw (s_t = prompt_ids), the response it produced (a_t = action_ids) with the engine's log-probs, and
the environment's reward. A `Trajectory` is one episode. `collate` turns trajectories into padded tensors.

Shapes: (N, T) = trajectories x steps; (B, L) = rows x tokens; (S, A) = steps x action tokens.
Token convention everywhere: the log-prob of input_ids[:, j] comes from the logits at position j - 1.
Packing and why it is exact: docs/method.md (equation 1) and docs/implementation-details.md (details 2, 7).
"""
from dataclasses import dataclass, field

import torch


@dataclass
class Step:
    """One turn of the step-level MDP (StepPO, 'step-level MDP'): state s_t, action a_t, reward r_t."""
    prompt_ids: list[int]  # s_t: every token the policy was conditioned on this turn
    action_ids: list[int]  # a_t: the whole response generated this turn
    engine_logprobs: list[float]  # log-prob of each action token as the rollout engine sampled it (not pi_old)
    reward: float = 0.0
    observation: str = ""  # the environment's message that followed this action
    action_text: str = ""
    info: dict = field(default_factory=dict)


@dataclass
class Trajectory:
    """One episode: its steps in order, the task it played (the group key) and how it ended."""
    steps: list[Step]
    task_id: str  # group key: trajectories of the same task instance share it
    terminated: bool  # True: the environment ended it; False: cut (step limit, context limit)
    success: bool = False
    next_prompt_ids: list[int] | None = None  # s_T, the state after the last step of a cut episode (bootstrap)
    error: str | None = None  # the env raised (rollout.collect): the episode is left out of training
    end: str = ""  # how it ended: "terminated" (the env), "step_limit" (--max-steps or the env's own), "context"
    #               (the next prompt would not fit), "token_budget" (--max-episode-tokens), "env_error"
    task: str = ""  # the first observation (what step 0 acted on)
    seed: int | None = None  # the task seed the env was reset with

    @property
    def total_reward(self) -> float:
        return sum(s.reward for s in self.steps)


@dataclass
class StepBatch:
    """Padded tensors for a list of trajectories. Rows hold one step each, or one whole trajectory when packed.

    Row tensors (B, L): input_ids, attention_mask, action_mask (float, 1 at action tokens), engine_logprobs (the
    rollout engine's log-probs of the action tokens; pi_old is the trainer's own, computed before the update).
    Step tensors (S,) in trajectory-then-step order: step_row (which row holds the step), value_positions
    (where the critic reads V(s_t): the token before the step's first action token), traj_index, step_index.
    action_index (S, A): flat index into a (B * L) tensor of each action token of each step, action_step_mask
    (S, A) marks the real ones, so `gather_steps` turns any (B, L) tensor into the step grid.
    Step grid (N, T): rewards, step_mask; terminated (N,). Unpacked, S == B and step_row == arange(B).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    engine_logprobs: torch.Tensor
    value_positions: torch.Tensor
    step_row: torch.Tensor
    traj_index: torch.Tensor
    step_index: torch.Tensor
    action_index: torch.Tensor
    action_step_mask: torch.Tensor
    rewards: torch.Tensor
    step_mask: torch.Tensor
    terminated: torch.Tensor

    @property
    def packed(self) -> bool:
        return self.input_ids.shape[0] != self.step_row.shape[0]

    def gather_steps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) per-token tensor -> (S, A) step grid of the action tokens (0 at padding). Differentiable."""
        return x.reshape(-1)[self.action_index] * self.action_step_mask

    def step_values(self, values: torch.Tensor) -> torch.Tensor:
        """(B, L) critic outputs -> (N, T) grid of V(s_t) read at the step boundaries, 0 outside step_mask."""
        v = values[self.step_row, self.value_positions]  # (S,)
        grid = torch.zeros(self.step_mask.shape, dtype=values.dtype, device=values.device)
        return grid.index_put((self.traj_index, self.step_index), v)

    def counts(self) -> tuple[int, int, int]:
        """(steps with at least one action token, action tokens, steps): what the losses average over."""
        return int((self.action_step_mask.sum(1) > 0).sum()), int(self.action_step_mask.sum()), len(self.step_row)

    def to(self, device) -> "StepBatch":
        return StepBatch(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})

    def select_rows(self, rows: torch.Tensor) -> "StepBatch":
        """The batch of rows `rows` (R,) only, cut to their longest row, with the steps those rows hold (in the same
        order). traj_index / step_index keep pointing into the original trajectories; the (N, T) grids are kept whole."""
        B, L = self.input_ids.shape
        new_L = int(self.attention_mask[rows].sum(1).max())  # rows are right-padded
        where = torch.full((B,), -1, dtype=torch.long)
        where[rows] = torch.arange(len(rows))
        keep = where[self.step_row] >= 0  # (S,) steps that live in the selected rows
        mask = self.action_step_mask[keep]
        index = self.action_index[keep]
        index = torch.where(mask > 0, where[index // L] * new_L + index % L, torch.zeros_like(index))
        return StepBatch(**{k: getattr(self, k)[rows, :new_L] for k in ("input_ids", "attention_mask", "action_mask",
                                                                       "engine_logprobs")},
                         value_positions=self.value_positions[keep], step_row=where[self.step_row[keep]],
                         traj_index=self.traj_index[keep], step_index=self.step_index[keep], action_index=index,
                         action_step_mask=mask, rewards=self.rewards, step_mask=self.step_mask, terminated=self.terminated)


def step_grids(trajectories: list[Trajectory]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The credit layout of a batch, without collating it: rewards (N, T), step_mask (N, T) (1 on real steps) and
    token_mask (N, T, A) (1 on each step's real action tokens), left-aligned."""
    N, T = len(trajectories), max(len(tr.steps) for tr in trajectories)
    A = max(1, max(len(s.action_ids) for tr in trajectories for s in tr.steps))
    rewards, step_mask, token_mask = torch.zeros(N, T), torch.zeros(N, T), torch.zeros(N, T, A)
    for i, tr in enumerate(trajectories):
        for t, s in enumerate(tr.steps):
            rewards[i, t], step_mask[i, t] = s.reward, 1.0
            token_mask[i, t, :len(s.action_ids)] = 1.0
    return rewards, step_mask, token_mask


def split_rows(batch: StepBatch, max_tokens: int) -> list[StepBatch]:
    """Micro-batches of `batch` holding at most `max_tokens` padded tokens each (rows x their longest row; a longer
    row goes alone), longest rows first. 0: [batch] itself. Every step lands in exactly one micro-batch."""
    if not max_tokens:
        return [batch]
    lengths = batch.attention_mask.sum(1)
    groups = []
    for r in lengths.argsort(descending=True, stable=True).tolist():
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(r)
        else:
            groups.append([r])
    return [batch.select_rows(torch.tensor(g)) for g in groups]


def extends(prefix: list[int], ids: list[int]) -> bool:
    """True when `ids` starts with `prefix` (the shared-prefix property that lets a trajectory be one row)."""
    return len(ids) >= len(prefix) and ids[: len(prefix)] == prefix


def packable(traj: Trajectory) -> bool:
    """Every step's prompt extends the previous step's prompt + action (StepPO systems design: shared-prefix reuse)."""
    return all(extends(a.prompt_ids + a.action_ids, b.prompt_ids) for a, b in zip(traj.steps, traj.steps[1:]))


def _check(traj: Trajectory, i: int) -> None:
    if not traj.steps:
        raise ValueError(f"trajectory {i} ({traj.task_id!r}) has no steps")
    for t, s in enumerate(traj.steps):
        if not s.prompt_ids:
            raise ValueError(f"trajectory {i} step {t}: empty prompt_ids (the critic needs a state token)")
        if len(s.engine_logprobs) != len(s.action_ids):
            raise ValueError(f"trajectory {i} step {t}: {len(s.action_ids)} action ids but {len(s.engine_logprobs)} engine_logprobs")


def collate(trajectories: list[Trajectory], pad_id: int, pack: bool = False) -> StepBatch:
    """Batch trajectories: one row per step, or (pack=True) one row per trajectory where `packable` holds.

    A packed row is the last step's prompt + action: every earlier step's context and action sit inside it
    at the same positions, so one causal forward pass gives every step's log-probs and V(s_t) (the paper's
    shared-prefix reuse). Trajectories without the prefix property fall back to one row per step.
    """
    if not trajectories:
        raise ValueError("collate needs at least one trajectory")
    rows, row_actions = [], []  # row token ids; per row, the (start, ids, logprobs) of the actions in it
    step_row, value_pos, traj_idx, step_idx = [], [], [], []
    for i, traj in enumerate(trajectories):
        _check(traj, i)
        as_one = pack and packable(traj)
        for t, s in enumerate(traj.steps):
            if not as_one or t == 0:
                rows.append([])
                row_actions.append([])
            start = len(s.prompt_ids)
            rows[-1] = s.prompt_ids + s.action_ids  # packed: the last step's row contains all earlier ones
            row_actions[-1].append((start, s.action_ids, s.engine_logprobs))
            step_row.append(len(rows) - 1)
            value_pos.append(start - 1)
            traj_idx.append(i)
            step_idx.append(t)

    B, L = len(rows), max(len(r) for r in rows)
    S, A = len(step_row), max(len(s.action_ids) for tr in trajectories for s in tr.steps)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    action_mask = torch.zeros(B, L)
    engine_logprobs = torch.zeros(B, L)
    action_index = torch.zeros(S, max(A, 1), dtype=torch.long)
    action_step_mask = torch.zeros(S, max(A, 1))
    k = 0
    for b, (row, acts) in enumerate(zip(rows, row_actions)):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, : len(row)] = 1
        for start, ids, lps in acts:
            n = len(ids)
            action_mask[b, start : start + n] = 1.0
            engine_logprobs[b, start : start + n] = torch.tensor(lps, dtype=torch.float32)
            action_index[k, :n] = b * L + torch.arange(start, start + n)
            action_step_mask[k, :n] = 1.0
            k += 1

    N, T = len(trajectories), max(len(tr.steps) for tr in trajectories)
    rewards = torch.zeros(N, T)
    step_mask = torch.zeros(N, T)
    for i, tr in enumerate(trajectories):
        rewards[i, : len(tr.steps)] = torch.tensor([s.reward for s in tr.steps], dtype=torch.float32)
        step_mask[i, : len(tr.steps)] = 1.0
    return StepBatch(
        input_ids=input_ids, attention_mask=attention_mask, action_mask=action_mask, engine_logprobs=engine_logprobs,
        value_positions=torch.tensor(value_pos), step_row=torch.tensor(step_row),
        traj_index=torch.tensor(traj_idx), step_index=torch.tensor(step_idx),
        action_index=action_index, action_step_mask=action_step_mask,
        rewards=rewards, step_mask=step_mask, terminated=torch.tensor([tr.terminated for tr in trajectories]),
    )
