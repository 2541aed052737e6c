"""The RL learner's batch source: rollouts instead of a shard cursor.

Each iteration takes the next ``rollout.prompts_per_iteration`` prompts of a stream whose
order is a pure function of (seed, epoch), asks the rollout engines for ``rollout.n``
samples of each (seeded by run seed, iteration, prompt position and sample index), scores
them, and turns them into micro-batches of named tensors for the policy objective. Rank 0
talks to the engines and the rewards (:class:`RolloutDriver`) and broadcasts the rollout;
every rank then computes the log-probs of its own rows (the learner's, before this
iteration's updates, and the reference's), and the advantages, which are a function of the
rewards alone and so identical everywhere.

Its checkpointed state is the iteration (and iterations skipped after a divergence): a
restarted run regenerates the same rollout from the same seeds.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from tidal.objectives.batch import Batch
from tidal.objectives.logprobs import IGNORE, model_token_logprobs
from tidal.parallel import collectives as C
from tidal.rlhf import algorithms as A
from tidal.rlhf.rollout import EngineLost, RolloutError, sample_seed

VAL_ITERATION = -1  # the seed slot of held-out generations: the same samples at every evaluation


class RolloutDriver:
    """Rank 0's side of an iteration: generate on the engines, decode, score."""

    def __init__(self, cfg, group, scorer, tokenizer):
        self.cfg, self.group, self.scorer, self.tok = cfg, group, scorer, tokenizer
        self.pool = None  # the reward model's actors, when there is one

    def rollout(self, prompts: List[Dict], positions: List[int], iteration: int, n: int,
                kill_engine: bool = False, kill_reward: bool = False) -> Dict:
        """Generate and score ``prompts``. ``kill_engine``/``kill_reward``: fault drills
        (``train.inject_faults``)."""
        return self.finish(self.launch(prompts, positions, iteration, n, kill_engine), kill_reward)

    def launch(self, prompts: List[Dict], positions: List[int], iteration: int, n: int,
               kill_engine: bool = False) -> Dict:
        """Start generating (returns at once); :meth:`finish` collects and scores."""
        r = self.cfg.rollout
        seeds = [[sample_seed(self.cfg.train.seed, iteration, p, s) for s in range(n)] for p in positions]
        handle = self.group.submit([p["ids"] for p in prompts], seeds, r.max_tokens, r.temperature,
                                   kill_one=kill_engine)
        return {**handle, "prompts": prompts, "iteration": iteration, "t0": time.time()}

    def finish(self, handle: Dict, kill_reward: bool = False) -> Dict:
        import ray

        prompts = handle["prompts"]
        t0 = time.time()
        out = self.group.collect(handle)
        gen_s = time.time() - t0  # time spent waiting for the engines (all of it when synchronous)
        if kill_reward and self.pool is not None and self.pool.actors:
            ray.kill(self.pool.actors[0], no_restart=True)  # the pool must replace it and re-score
        samples = [(i, s) for i, row in enumerate(out) for s in row]
        completions = [self.tok.decode(s["ids"], skip_special_tokens=True) for _, s in samples]
        t1 = time.time()
        res = self.scorer.score([prompts[i]["text"] for i, _ in samples], completions,
                                [s["ids"] for _, s in samples], [prompts[i]["meta"] for i, _ in samples],
                                sequences=[prompts[i]["ids"] + s["ids"] for i, s in samples])
        return {"owner": [i for i, _ in samples], "responses": [s["ids"] for _, s in samples],
                "logps": [s["logps"] for _, s in samples], "truncated": [s["truncated"] for _, s in samples],
                "versions": [s["version"] for _, s in samples], "completions": completions,
                "rewards": res.total.tolist(), "dropped": res.dropped.tolist(),
                "parts": {k: v.tolist() for k, v in res.parts.items()}, "errors": dict(res.errors),
                "gen_s": gen_s, "gen_wall_s": time.time() - handle["t0"], "score_s": time.time() - t1,
                "engines": len(self.group.actors),
                "reward_actor_restarts": self.pool.replaced if self.pool is not None else 0,
                "prompt_ids": [prompts[i]["ids"] for i, _ in samples],
                "prompt_text": [prompts[i]["text"] for i, _ in samples]}


class RolloutSource:
    name = "source"

    def __init__(self, cfg, prompts: List[Dict], val_prompts: List[Dict], rank: int, world: int,
                 device: torch.device, pad_id: int, driver: Optional[RolloutDriver] = None):
        self.cfg, self.prompts, self.val_prompts = cfg, prompts, val_prompts
        self.rank, self.world, self.device, self.pad = rank, world, device, pad_id
        self.driver = driver
        # the KL coefficient (fixed or adaptive); the learner checkpoints it as the stage state
        a = cfg.algorithm
        self.kl = A.KLController(a.kl_controller, a.kl_coef, a.kl_target, a.kl_horizon)
        self.iteration = 0
        self.skipped: List[List[int]] = []
        self.rows: List[Dict] = []  # this rank's rows of the current rollout, by minibatch
        self.minibatch = 0
        # set by the learner: events to the driver, a collective weight sync to every engine
        # (after engines were replaced), and the fault drills
        self.emit: Callable[[Dict], None] = lambda record: None
        self.resync: Optional[Callable[[], Dict]] = None
        self.injector = None
        # asynchronous mode (rollout.max_staleness > 0): rank 0's generation of the next
        # iteration, started before this one trains; the engines' weight version
        self.ahead: Optional[Dict] = None
        self.engine_version = 0

    # -- the prompt stream -------------------------------------------------------------
    def positions(self, iteration: int) -> List[int]:
        p = self.cfg.rollout.prompts_per_iteration
        return list(range(iteration * p, (iteration + 1) * p))

    def prompt_at(self, position: int) -> Dict:
        n = len(self.prompts)
        epoch, k = divmod(position, n)
        order = np.random.default_rng([self.cfg.data.seed, epoch]).permutation(n)
        return self.prompts[int(order[k])]

    # -- BatchSource -------------------------------------------------------------------
    def batches(self, rank: int, world: int, micro: int) -> List[Batch]:
        rows = self.rows[self.minibatch]
        return [self.make_batch(rows[i:i + micro]) for i in range(0, len(rows), micro)]

    def advance(self) -> None:
        self.iteration += 1
        self.rows, self.minibatch = [], 0

    # -- asynchronous mode -----------------------------------------------------------------
    def needs_sync(self, last: bool) -> bool:
        """Whether the engines must get the learner's weights now (the iteration counter
        just moved to ``self.iteration``). Synchronous: always. With ``max_staleness = k``
        the next generation starts during the next iteration and is trained on one
        iteration later, so the engines may hold a policy up to ``k - 1`` versions behind
        now; the final policy is always synced (held-out evaluation, export)."""
        k = self.cfg.rollout.max_staleness
        return k == 0 or last or self.iteration + 1 - self.engine_version > k

    def start_ahead(self) -> None:
        """Rank 0, asynchronous mode: start generating iteration ``iteration + 1`` with
        the engines' current weights, to train on it next."""
        nxt, t = self.iteration + 1, self.cfg.train
        if self.rank != 0 or not self.cfg.rollout.max_staleness or nxt >= (t.stop_at_step or t.max_steps):
            return
        positions = self.positions(nxt)
        kill = self.injector is not None and self.injector.once("kill_engine", nxt + 1)
        self.ahead = self.driver.launch([self.prompt_at(p) for p in positions], positions, nxt,
                                        self.cfg.rollout.n, kill_engine=kill)

    def drop_ahead(self) -> None:
        """Forget a generation in flight (after a rollback or a restore: its iteration's
        prompts or weights are no longer the ones to train on)."""
        self.ahead = None

    def skip_failed(self, before: Dict) -> Dict:
        self.skipped = [list(w) for w in before["skipped"]]
        window = [self.iteration, before["iteration"] + 1]
        self.skipped.append(window)
        self.iteration, self.rows, self.minibatch = window[1], [], 0
        self.drop_ahead()
        p = self.cfg.rollout.prompts_per_iteration
        return {"skipped_samples": [window[0] * p, window[1] * p], "skipped_batches": window[1] - window[0]}

    def state_dict(self) -> Dict:
        return {"iteration": self.iteration, "skipped": [list(w) for w in self.skipped]}

    def load_state_dict(self, state: Dict) -> None:
        self.iteration = int(state["iteration"])
        self.skipped = [list(w) for w in state.get("skipped", [])]
        self.rows, self.minibatch = [], 0
        self.drop_ahead()

    # -- one iteration's rollout -----------------------------------------------------------
    def my_rows(self, n_seqs: int) -> List[List[int]]:
        """This rank's row indices per minibatch: each minibatch split evenly over ranks."""
        m = self.cfg.algorithm.minibatches
        size = n_seqs // m
        share = size // self.world
        return [list(range(b * size + self.rank * share, b * size + (self.rank + 1) * share)) for b in range(m)]

    def collect(self, engine, reference) -> Dict:
        """Generate, score and prepare this iteration's rows; returns the rollout metrics.
        With a value model (``engine.companions["value"]``, PPO) advantages come per token
        from GAE over the KL-penalised rewards; otherwise per sequence from the group
        estimator. The KL controller then takes the rollout's KL."""
        cfg, n = self.cfg, self.cfg.rollout.n
        positions = self.positions(self.iteration)
        prompts = [self.prompt_at(p) for p in positions] if self.rank == 0 else []
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead["iteration"] != self.iteration:
            ahead = None  # started for another iteration (the run moved since)
        payload = self.generate(prompts, positions, self.iteration, n, ahead)
        payload = self._reject_stale(payload)
        self.start_ahead()  # asynchronous mode: the engines work on the next one meanwhile
        t0 = time.time()
        rows = [{"prompt": payload["prompt_ids"][i], "response": payload["responses"][i],
                 "rollout_logp": payload["logps"][i], "index": i} for i in range(len(payload["responses"]))]
        plan = self.my_rows(len(rows))
        mine = [rows[i] for part in plan for i in part]
        critic = engine.companions.get("value")
        self._learner_logps(engine, reference, mine, critic)
        a, beta = cfg.algorithm, self.kl.value
        penalty = a.kl_coef > 0 and a.kl_in_reward
        seq_kl = torch.zeros(len(rows), dtype=torch.float64)  # per-sequence k1 KL to the reference
        if reference is not None:
            for r in mine:
                seq_kl[r["index"]] = float(A.kl_penalty(r["old_logp"], r["ref_logp"], "k1").sum())
            seq_kl = C.all_sum(seq_kl, self.world)
        keep = ~torch.tensor(payload["dropped"], dtype=torch.bool)
        if a.drop_equal_groups and n > 1:
            keep &= ~A.equal_groups(torch.tensor(payload["rewards"]), n)
        for r in mine:
            r["keep"], r["score"] = bool(keep[r["index"]]), float(payload["rewards"][r["index"]])
        rewards = torch.tensor(payload["rewards"], dtype=torch.float64)
        out = {}
        if critic is not None:
            if a.reward_norm and keep.any():
                kept = rewards[keep]
                mean, std = float(kept.mean()), float(kept.std(unbiased=False)) if len(kept) > 1 else 0.0
                for r in mine:
                    r["score"] = (r["score"] - mean) / (std + a.std_eps)
            adv = self._gae(mine, len(rows), payload["truncated"], beta if penalty else 0.0, out)
        else:
            if penalty:
                rewards = rewards - beta * seq_kl
            adv = A.compute_advantages(a.estimator, rewards, n, a.std_eps)
            for r in mine:
                r["advantage"] = float(adv[r["index"]])
        self.rows = [[rows[i] for i in part] for part in plan]
        self.minibatch = 0
        out.update(self._metrics(payload, adv, keep, mine))
        if reference is not None:
            kl = float(seq_kl[keep].mean()) if keep.any() else 0.0
            out.update(kl_seq=kl, kl_coef=beta)
            if critic is None or self.iteration >= cfg.critic.warmup_iterations:  # the policy moves
                self.kl.update(kl, int(keep.sum()))
        out["logp_s"] = time.time() - t0
        out["_samples"] = payload
        return out

    def _gae(self, mine: List[Dict], n_rows: int, truncated: List[bool], beta: float, out: Dict) -> torch.Tensor:
        """PPO: per-token rewards (``-beta * k1`` on every token, the score on the last),
        GAE over this rank's rows, advantages whitened over the whole batch (every rank's
        kept tokens); sets each row's ``advantage`` and ``returns`` (tensors) and adds the
        critic's metrics to ``out``. Returns the rows' mean advantages (for the metrics)."""
        a = self.cfg.algorithm
        width = max([len(r["response"]) for r in mine] + [1])
        shape = (len(mine), width)
        rew, val = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
        mask = torch.zeros(shape, dtype=torch.bool)
        boot = torch.zeros(len(mine), dtype=torch.float64)
        for j, r in enumerate(mine):
            k = len(r["response"])
            if not k:
                continue
            mask[j, :k] = r["keep"]
            val[j, :k] = r["old_values"].double()
            if beta and r["ref_logp"] is not None:
                rew[j, :k] = -beta * A.kl_penalty(r["old_logp"], r["ref_logp"], "k1").double()
            rew[j, k - 1] += r["score"]
            if a.bootstrap_truncated and truncated[r["index"]]:  # the state after it has a value
                boot[j] = r["bootstrap"]
        adv, ret = A.gae(rew, val, mask, a.gamma, a.lam, boot)
        stats = C.all_sum(torch.cat([A.whiten_stats(adv, mask), A.whiten_stats(ret, mask),
                                     A.whiten_stats(ret - val, mask)[:2]]), self.world)
        if a.whiten_advantages:
            adv = A.whiten(adv, mask, stats[:3])
        for j, r in enumerate(mine):
            k = len(r["response"])
            r["advantage"], r["returns"] = adv[j, :k].float(), ret[j, :k].float()
        n = float(stats[2].clamp(min=1))
        var_ret = float(stats[4] / n - (stats[3] / n) ** 2)
        var_err = float(stats[7] / n - (stats[6] / n) ** 2)
        out.update(returns_mean=float(stats[3] / n),
                   explained_var=1.0 - var_err / var_ret if var_ret > 0 else 0.0)
        seq = torch.zeros(n_rows, dtype=torch.float64)
        for j, r in enumerate(mine):
            if mask[j].any():
                seq[r["index"]] = float(adv[j][mask[j]].mean())
        return C.all_sum(seq, self.world)

    def _reject_stale(self, payload: Dict) -> Dict:
        """Samples from a policy more than ``max_staleness`` versions behind the learner's
        are dropped (counted); the realised staleness of the rest is logged."""
        k = self.cfg.rollout.max_staleness
        lag = [self.iteration - v for v in payload["versions"]]
        stale = [x > k for x in lag]
        payload["dropped"] = [d or s for d, s in zip(payload["dropped"], stale)]
        payload["staleness"] = lag
        payload["stale_rejected"] = sum(stale)
        return payload

    def generate(self, prompts: List[Dict], positions: List[int], iteration: int, n: int,
                 ahead: Optional[Dict] = None) -> Dict:
        """Rank 0 generates and scores ``prompts`` (the other ranks pass nothing); every
        rank gets the payload. When engines die mid-generation (or miss the deadline) rank 0
        replaces them, every rank takes part in syncing the current weights to the group,
        and the iteration is generated again: the same seeds give the same samples, so the
        run goes on as if nothing happened (the event is logged). ``rollout.retries`` bounds it."""
        retries = self.cfg.rollout.retries
        for attempt in range(retries + 1):
            payload = None
            if self.rank == 0:
                step = iteration + 1
                drill = self.injector is not None and iteration >= 0
                try:
                    kill_reward = drill and self.injector.once("kill_reward", step)
                    if ahead is not None and attempt == 0:  # started during the last iteration
                        payload = self.driver.finish(ahead, kill_reward)
                    else:
                        payload = self.driver.rollout(prompts, positions, iteration, n,
                                                      kill_engine=drill and self.injector.once("kill_engine", step),
                                                      kill_reward=kill_reward)
                except EngineLost as e:
                    payload = {"_error": str(e)}
                    if attempt < retries and self.resync is not None:
                        t0 = time.time()
                        try:
                            payload = {"_lost": str(e), **self.driver.group.replace(e.dead), "_t0": t0}
                        except RolloutError as again:
                            payload = {"_error": f"{e}; restarting the engines failed: {again}"}
                except RolloutError as e:
                    payload = {"_error": str(e)}
            payload = C.broadcast(payload, self.world)
            if "_error" in payload:
                raise RolloutError(f"iteration {iteration + 1}: {payload['_error']}")
            if "_lost" not in payload:
                return payload
            # every rank: new engines get the current policy (survivors of an elastic pool have it)
            info = self.resync() if payload["resync"] else {}
            self.emit({"event": "engine_lost", "step": self.iteration, "iteration": iteration + 1,
                       "attempt": attempt + 1, "reason": payload["_lost"], "engines_lost": payload["engines_lost"],
                       "restart_s": payload["restart_s"], "sync_s": info.get("sync_s"),
                       "recovery_s": time.time() - payload["_t0"]})
        raise AssertionError("unreachable")  # the last attempt either returns or raises

    @torch.no_grad()
    def _learner_logps(self, engine, reference, rows: List[Dict], critic=None) -> None:
        """Per row: the policy's log-probs of its response before any update (``old_logp``)
        and the reference's (``ref_logp``), computed in micro-batches on this rank; with a
        critic, its values before any update (``old_values``, and ``bootstrap``: the value
        after the last token)."""
        from tidal.objectives.value import token_values

        micro = self.cfg.train.micro_batch_size
        model = engine.model
        was = model.training
        model.eval()
        if critic is not None:
            critic.model.eval()
        try:
            for i in range(0, len(rows), micro):
                chunk = rows[i:i + micro]
                batch = self.make_batch(chunk, fields=False)
                old, _ = model_token_logprobs(model, batch["targets"], input_ids=batch["input_ids"], use_cache=False)
                ref = None
                if reference is not None:
                    ref, _ = model_token_logprobs(reference, batch["targets"], input_ids=batch["input_ids"],
                                                  use_cache=False)
                values = None if critic is None else token_values(critic.model, batch["input_ids"])
                for j, r in enumerate(chunk):
                    start, length = len(r["prompt"]) - 1, len(r["response"])
                    r["old_logp"] = old[j, start:start + length].float().cpu()
                    r["ref_logp"] = None if ref is None else ref[j, start:start + length].float().cpu()
                    if values is not None:
                        r["old_values"] = values[j, start:start + length].cpu()
                        r["bootstrap"] = float(values[j, start + length])
        finally:
            model.train(was)
            if critic is not None:
                critic.model.train(was)

    def make_batch(self, rows: List[Dict], fields: bool = True) -> Batch:
        """Prompt + response per row, right-padded; targets on the response tokens only;
        the per-token fields of the policy objective at the positions that predict them."""
        width = max(len(r["prompt"]) + len(r["response"]) for r in rows)
        n = len(rows)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        targets = torch.full((n, width), IGNORE, dtype=torch.long)
        names = ("old_logp", "ref_logp", "rollout_logp", "advantages", "is_weights") if fields else ()
        if fields and "returns" in rows[0]:
            names += ("returns", "old_values")
        floats = {k: torch.zeros(n, width, dtype=torch.float32) for k in names}
        tokens = 0
        for j, r in enumerate(rows):
            p, resp = r["prompt"], r["response"]
            seq = p + resp
            ids[j, :len(seq)] = torch.tensor(seq)
            tokens += len(seq)
            if not resp or (fields and not r.get("keep", True)):
                continue
            s, e = len(p) - 1, len(p) - 1 + len(resp)
            targets[j, s:e] = torch.tensor(resp)
            if fields:
                floats["old_logp"][j, s:e] = r["old_logp"]
                floats["rollout_logp"][j, s:e] = torch.tensor(r["rollout_logp"])
                floats["advantages"][j, s:e] = r["advantage"]
                if r["ref_logp"] is not None:
                    floats["ref_logp"][j, s:e] = r["ref_logp"]
                if "returns" in floats:
                    floats["returns"][j, s:e] = r["returns"]
                    floats["old_values"][j, s:e] = r["old_values"]
        batch = {"input_ids": ids, "targets": targets, "tokens": torch.tensor(tokens)}
        batch["loss_mask"] = targets != IGNORE
        if fields:
            alg = self.cfg.algorithm
            # asynchronous samples come from an older policy: always corrected (token level
            # unless algorithm.tis asks for sequence level)
            level = alg.tis if alg.tis != "off" else ("token" if self.cfg.rollout.max_staleness else "off")
            if level != "off":
                floats["is_weights"] = A.truncated_is(floats["old_logp"], floats["rollout_logp"],
                                                      batch["loss_mask"], level, alg.tis_cap)
            else:
                del floats["is_weights"]
            batch.update(floats)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _metrics(self, payload: Dict, adv: torch.Tensor, keep: torch.Tensor, mine: List[Dict]) -> Dict:
        rewards = np.asarray(payload["rewards"], dtype=np.float64)
        lengths = np.asarray([len(r) for r in payload["responses"]])
        gen_tokens = int(lengths.sum())
        out = {"iteration": self.iteration + 1, "reward_mean": float(rewards.mean()),
               "reward_std": float(rewards.std()), "reward_min": float(rewards.min()),
               "reward_max": float(rewards.max()), "response_len_mean": float(lengths.mean()),
               "response_len_max": int(lengths.max()), "truncated_frac": float(np.mean(payload["truncated"])),
               "adv_mean": float(adv.mean()), "adv_std": float(adv.std()) if len(adv) > 1 else 0.0,
               "kept_frac": float(keep.float().mean()), "reward_errors": sum(payload["errors"].values()),
               "reward_actor_restarts": payload["reward_actor_restarts"],  # so far in this attempt
               "gen_s": payload["gen_s"], "score_s": payload["score_s"],
               "gen_tokens_per_s": gen_tokens / max(payload["gen_wall_s"], 1e-9),
               "gen_wall_s": payload["gen_wall_s"], "engines": payload["engines"],
               "policy_version": max(payload["versions"]) if payload["versions"] else 0}
        lag = np.asarray(payload["staleness"])
        out.update(staleness_mean=float(lag.mean()), staleness_max=int(lag.max()),
                   stale_rejected=payload["stale_rejected"])
        for v in range(self.cfg.rollout.max_staleness + 1):  # the realised distribution
            out[f"staleness/{v}"] = float(np.mean(lag == v))
        for name, values in payload["parts"].items():
            out[f"reward/{name}"] = float(np.mean(values))
        # the learner's log-probs against the engine's for the same tokens: training-
        # inference mismatch (a KL estimate), reduced over ranks
        old = torch.cat([r["old_logp"].double() for r in mine] or [torch.zeros(0, dtype=torch.float64)])
        roll = torch.tensor([x for r in mine for x in r["rollout_logp"]], dtype=torch.float64)
        gap = A.logp_gap(old, roll, torch.ones_like(old, dtype=torch.bool))
        sums = C.all_sum(torch.stack([gap["logp_gap_abs"][0], gap["logp_gap_kl"][0],
                                      gap["logp_gap_abs"][1]]).double(), self.world)
        out["logp_gap_abs"] = float(sums[0] / sums[2].clamp(min=1))
        out["logp_gap_kl"] = float(sums[1] / sums[2].clamp(min=1))
        return out

    def held_out(self) -> Dict:
        """Mean reward of one sample per held-out prompt (the same seeds every time)."""
        if not self.val_prompts:
            return {}
        payload = self.generate(self.val_prompts if self.rank == 0 else [], list(range(len(self.val_prompts))),
                                VAL_ITERATION, 1)
        return {"val_reward": float(np.mean(payload["rewards"])),
                "val_response_len": float(np.mean([len(r) for r in payload["responses"]]))}
