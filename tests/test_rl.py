"""Online RL (mlxft.methods.rl, mlxft.losses.rl, mlxft.rewards, on both engines): advantages and the policy loss by
hand on three array libraries (its gradient is the policy gradient), reward functions and their
errors, the sampler, both backends' loss and gradients on the same rollout, and runs end to end."""

from __future__ import annotations

import json
from functools import partial

import mlx.core as mx
import numpy as np
import pytest

from mlxft.config import RLConfig, load_config
from mlxft.errors import UserError
from mlxft.losses.rl import group_advantages, policy_objective, ppo_advantages, summarizer
from mlxft.rewards import arithmetic, load_reward_function, number_only, score
from mlxft.train.runs import Run

# --- advantages and the loss -------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = np.array([1, 0, 0, 1, 0, 0, 0, 0], dtype=float)  # two prompts, G = 4
    # GRPO: (r - 0.5) / (unbiased std sqrt(1/3) + 1e-4); a group of equal rewards learns nothing.
    assert group_advantages(rewards, 4).tolist() == pytest.approx([0.86588, -0.86588, -0.86588, 0.86588, 0, 0, 0, 0], abs=1e-5)
    assert group_advantages(rewards, 4, scale_rewards=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]  # Dr. GRPO
    # RLOO: r - the mean of the other three.
    assert group_advantages(rewards, 4, "rloo").tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])


def objective_inputs(xp_name):
    logps = [[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]
    reference = [[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]]  # the first token's log-ratio to the reference is 0.5
    weights = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    advantages = [1.0, -2.0]
    if xp_name == "numpy":
        return np, (lambda x: x), [np.array(v) for v in (logps, reference, weights, advantages)]
    if xp_name == "mlx":
        return mx, mx.stop_gradient, [mx.array(v) for v in (logps, reference, weights, advantages)]
    torch = pytest.importorskip("torch")
    return torch, torch.Tensor.detach, [torch.tensor(v, dtype=torch.float64) for v in (logps, reference, weights, advantages)]


@pytest.mark.parametrize("xp_name", ["numpy", "mlx", "torch"])
@pytest.mark.parametrize("loss_type, loss, count", [("grpo", 1.0, 2), ("dr_grpo", 0.0, 2), ("dapo", 0.0, 3)])
def test_policy_loss_by_hand(xp_name, loss_type, loss, count):
    xp, detach, (logps, reference, weights, advantages) = objective_inputs(xp_name)
    rc = RLConfig(beta=0.0, loss_type=loss_type, max_completion_length=4)
    # ratio 1: the per-token loss is -A. grpo: mean(-1, -1) + mean(2) = 1 over 2 completions;
    # dr_grpo: (-1 - 1 + 2) / 4; dapo: the same sum over 3 tokens.
    loss_sum, sums = policy_objective(logps, reference, weights, advantages, rc, xp=xp, detach=detach)
    assert float(loss_sum) == pytest.approx(loss) and float(sums[0]) == count
    assert [float(v) for v in sums[2:]] == [2, 3, 0, 0, 0]  # completions, tokens, KL (beta 0: no reference run), clipped, value loss
    with_kl, sums = policy_objective(logps, reference, weights, advantages, RLConfig(beta=0.1, loss_type="grpo"), xp=xp, detach=detach)
    kl = np.exp(-0.5) + 0.5 - 1  # k3 at the first token: exp(ref - logp) - (ref - logp) - 1
    assert float(with_kl) == pytest.approx(1.0 + 0.1 * kl / 2, abs=1e-6)
    assert float(sums[4]) == pytest.approx(kl, abs=1e-6)


def test_the_gradient_is_the_policy_gradient():
    # d loss / d logπ(token) = -A / (tokens of its completion) for grpo at ratio 1: not zero, as a
    # loss written with π_old = π without the ratio trick would make it.
    _, _, (logps, reference, weights, advantages) = objective_inputs("mlx")
    rc = RLConfig(beta=0.0)
    grad = mx.grad(lambda x: policy_objective(x, reference, weights, advantages, rc, xp=mx, detach=mx.stop_gradient)[0])(logps)
    assert np.array(grad).ravel().tolist() == pytest.approx([-0.5, -0.5, 0.0, 2.0, 0.0, 0.0])


def test_ppo_advantages_by_hand():
    # Two completions of 3 and 2 tokens, scored 1 and -1; beta 0.1 on log-ratios to the reference.
    logps = np.array([[0.1, 0.2, 0.3], [0.5, 0.5, 0.0]])
    values = np.array([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])  # 9 sits on padding: it must not count
    weights = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rc = RLConfig(algo="ppo", beta=0.1, gamma=1.0, lam=0.95)
    advantages, returns = ppo_advantages(np.array([1.0, -1.0]), logps, np.zeros_like(logps), values, weights, rc)
    # Rewards: -0.1 * log-ratio per token, the score added at the last. Row 2: r = (-0.05, -1.05);
    # deltas r_t + V_t+1 - V_t = (0.05, -1.45); GAE (-1.3275, -1.45); returns GAE + V = (-1.0275, -1.05).
    # Row 1: r = (-0.01, -0.02, 0.97); deltas (-0.31, -0.12, 0.87); GAE (0.361175, 0.7065, 0.87).
    assert returns.ravel().tolist() == pytest.approx([0.861175, 0.9065, 0.97, -1.0275, -1.05, 0.0], abs=1e-6)
    raw = np.array([0.361175, 0.7065, 0.87, -1.3275, -1.45])
    assert advantages[weights > 0].tolist() == pytest.approx(((raw - raw.mean()) / raw.std(ddof=1)).tolist(), abs=1e-5)
    assert advantages[1, 2] == 0.0
    # gamma = lambda = 1 without the KL: every token's return is its completion's score.
    _, returns = ppo_advantages(np.array([1.0, -1.0]), logps, logps, values, weights, RLConfig(algo="ppo", lam=1.0))
    assert returns.ravel().tolist() == pytest.approx([1, 1, 1, -1, -1, 0], abs=1e-6)


def test_ppo_value_loss_is_clipped_around_the_rollout_values():
    rc = RLConfig(algo="ppo", beta=0.0, vf_coef=1.0, cliprange_value=0.2, loss_type="dapo")
    weights, zeros = mx.ones((1, 3)), mx.zeros((1, 3))
    old = mx.array([[0.0, 0.0, 0.0]])
    returns = mx.array([[0.0, 1.0, -1.0]])

    def loss(values):
        return policy_objective(zeros, zeros, weights, zeros, rc, xp=mx, detach=mx.stop_gradient, values=values,
                                old_values=old, returns=returns)

    values = mx.array([[0.5, 0.5, 0.5]])
    (total, sums), grad = loss(values), mx.grad(lambda v: loss(v)[0])(values)
    # Token 1: moved away from its return: the unclipped 0.5^2 is larger; gradient (v - R) = 0.5.
    # Token 2: moved toward it past the clip: max(0.5^2, (0.2 - 1)^2) is the clipped branch: no gradient.
    # Token 3: unclipped (1.5^2 > 1.2^2): gradient 1.5. A sum over tokens (dapo; the update divides).
    assert float(total) == pytest.approx(0.5 * (0.25 + 0.64 + 2.25)) and float(sums[0]) == 3
    assert np.array(grad).ravel().tolist() == pytest.approx([0.5, 0.0, 1.5])
    assert float(sums[6]) == pytest.approx(0.5 * (0.25 + 0.64 + 2.25))  # value_loss


def test_a_second_update_on_a_rollout_clips_the_ratio():
    # num_iterations > 1: the ratio is to the rollout's log-probs. Up by 1.5x with a positive
    # advantage is past 1 + epsilon: clipped, no gradient; down by 1.5x is not clipped.
    rc = RLConfig(beta=0.0, epsilon=0.2, loss_type="dapo", num_iterations=2)
    old = mx.zeros((1, 2))
    logps = mx.array([[np.log(1.5), -np.log(1.5)]])
    weights, advantages = mx.ones((1, 2)), mx.array([1.0])

    def loss(x):
        return policy_objective(x, old, weights, advantages, rc, xp=mx, detach=mx.stop_gradient, old_logps=old)

    grad = mx.grad(lambda x: loss(x)[0])(logps)
    assert np.array(grad).ravel().tolist() == pytest.approx([0.0, -1 / 1.5], abs=1e-6)  # d(-ρA)/d logπ = -ρA
    assert float(loss(logps)[1][5]) == 1  # clipped tokens


def test_summary_metrics_carry_trl_names():
    names = ["arithmetic"]
    # count, loss, completions, tokens, kl, clipped, value loss, entropy | reward, reward², group std,
    # zero-std groups, groups, truncated | sum, squares
    sums = np.array([4, 2.0, 4, 20, 1.0, 0, 3.0, 10.0, 2.0, 2.0, 1.1547, 1, 2, 1, 2.0, 2.0])
    metrics = summarizer(names)(sums)
    assert "value_loss" not in metrics and summarizer(names, ppo=True)(sums)["value_loss"] == 0.15  # per token
    assert metrics["loss"] == 0.5 and metrics["reward"] == 0.5 and metrics["rewards/arithmetic/mean"] == 0.5
    assert metrics["rewards/arithmetic/std"] == pytest.approx(0.5) and metrics["kl"] == 0.05 and metrics["entropy"] == 0.5
    assert metrics["completions/mean_length"] == 5 and metrics["completions/clipped_ratio"] == 0.25
    assert metrics["frac_reward_zero_std"] == 0.5 and metrics["reward_std"] == pytest.approx(0.57735)


# --- reward functions ----------------------------------------------------------------------------------


def test_bundled_reward_functions():
    completions = ["12", "7 + 5 = 12", "The answer is 13.", "twelve", "12."]
    assert arithmetic([""] * 5, completions, answer=["12"] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert number_only([""] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_reward_functions_load_from_a_module_or_a_file(tmp_path):
    assert load_reward_function("mlxft.rewards:arithmetic")[1] is arithmetic
    (tmp_path / "mine.py").write_text("def brevity(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n")
    name, function = load_reward_function(f"{tmp_path / 'mine.py'}:brevity")
    assert name == "brevity" and function(["p"], ["abc"]) == [-3]
    for spec, message in [("nocolon", "module:function"), ("mlxft.rewards:nothing", "has no function nothing"),
                          ("no_such_module_xyz:f", "cannot import"), (f"{tmp_path / 'absent.py'}:f", "no such file")]:
        with pytest.raises(UserError, match=message):
            load_reward_function(spec)


@pytest.mark.parametrize("body, message", [
    ("raise ValueError('bad row')", "raised ValueError: bad row .*'What is 1 \\+ 1\\?'"),
    ("return [1.0]", "returned 1 values for 2 completions; it must return one number per completion"),
    ("return [float('nan'), 1.0]", "returned nan for prompt 'What is 1 \\+ 1\\?' and completion '2'"),
    ("return ['1', 1.0]", "returned '1'"),
])
def test_a_bad_reward_function_is_named_with_its_prompt_and_completion(tmp_path, body, message):
    (tmp_path / "bad.py").write_text(f"def f(prompts, completions, **kw):\n    {body}\n")
    functions = [load_reward_function(f"{tmp_path / 'bad.py'}:f")]
    with pytest.raises(UserError, match=f"reward function f .*{message}"):
        score(functions, ["What is 1 + 1?"] * 2, ["2", "3"], {"answer": ["2", "2"]})


# --- the sampler and the loss on both backends -------------------------------------------------------


def test_greedy_samples_are_mlx_lms_greedy_answer_and_stop_at_the_end_token(tiny_model_dir):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    from mlxft.backends.mlx import model as mlx_model
    from mlxft.backends.mlx.generate import sample_completions

    model, tokenizer, _ = mlx_model.load(str(tiny_model_dir))
    prompt = tokenizer.encode("What is 3 + 4?")
    samples = sample_completions(model, prompt, 3, max_tokens=12, temperature=0.0, stop=set())
    assert samples[0] == samples[1] == samples[2] and len(samples[0]) == 12  # the KV cache copied to each row
    reference = generate(model, tokenizer, prompt, max_tokens=12, sampler=make_sampler(temp=0.0))
    assert tokenizer.decode(samples[0]) == reference
    stop = {samples[0][4]}
    cut = sample_completions(model, prompt, 2, max_tokens=12, temperature=0.0, stop=stop)
    assert cut[0] == samples[0][: samples[0].index(samples[0][4]) + 1]  # ends with its first stop token
    mx.random.seed(3)
    drawn = sample_completions(model, prompt, 4, max_tokens=8, temperature=1.0, stop=set())
    assert len({tuple(s) for s in drawn}) > 1  # sampled, not four copies


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_both_backends_give_the_same_loss_and_gradients_on_the_same_rollout(tiny_model_dir, tmp_path, algo):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from test_parity import starting_adapter

    from mlxft.backends.mlx import lora as mlx_lora
    from mlxft.backends.mlx import model as mlx_model
    from mlxft.backends.mlx import steps as mlx_steps
    from mlxft.backends.torch import lora as torch_lora
    from mlxft.backends.torch import model as torch_model
    from mlxft.backends.torch import steps as torch_steps
    from mlxft.data.batching import collate, scored_targets
    from mlxft.data.encode import Example
    from mlxft.losses.rl import reward_sums
    from mlxft.models.adapters import attach_adapter
    from mlxft.models.heads import value_head_init

    adapter = starting_adapter(tiny_model_dir, tmp_path / "start")
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 200, size=7).tolist()
    completions = [rng.integers(3, 200, size=n).tolist() for n in (5, 3, 6, 2)]  # fixed: no sampling on either side
    batch = collate([Example(prompt + c, [0] * 7 + [1] * len(c)) for c in completions], pad_id=0, pad_to_multiple=4)
    targets = scored_targets(batch)
    rewards = np.array([1.0, 0.0, 0.0, 1.0])
    carried = reward_sums(rewards, rewards[None], 4, 0)
    shape = targets.tokens.shape
    if algo == "grpo":
        rc = RLConfig(beta=0.1)
        advantages, returns = group_advantages(rewards, 4).astype(np.float32), np.zeros(shape, np.float32)
    else:  # a second update on the rollout: π_old below is the reference, so the ratios are not 1 and some clip
        rc = RLConfig(algo="ppo", beta=0.1, num_iterations=2, epsilon=0.05, cliprange_value=0.05, vf_coef=0.5)
        advantages, returns = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    old_values = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    arrays = (batch.input_ids[:, :-1], targets.positions, targets.tokens, targets.weights)

    model, _, _ = mlx_model.load(str(tiny_model_dir))
    attach_adapter(mlx_lora, model, adapter)
    hidden = model.args.hidden_size
    model.value_head = nn.Linear(hidden, 1)
    model.value_head.update({"weight": mx.array(value_head_init(hidden, 0)), "bias": mx.array([0.1])})
    model.eval()
    inputs = [mx.array(a) for a in arrays]
    reference = mlx_steps.make_token_reference_step(model, True)(*inputs[:3])
    rest = [mx.array(a) for a in (old_values, advantages, returns, carried)]
    loss = lambda m: mlx_steps.rl_loss(m, *inputs, reference, reference, *rest, split_head=True, rc=rc)  # noqa: E731
    (mlx_loss, mlx_sums), mlx_grads = nn.value_and_grad(model, loss)(model)
    mlx_grads = {k: np.array(v) for k, v in tree_flatten(mlx_grads)}

    tmodel, _, _ = torch_model.load(str(tiny_model_dir), device=torch.device("cpu"))
    attach_adapter(torch_lora, tmodel, adapter)
    tmodel.value_head = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        tmodel.value_head.weight.copy_(torch.from_numpy(value_head_init(hidden, 0)))
        tmodel.value_head.bias.fill_(0.1)
    tmodel.eval()
    tensors = torch_model.to_device(torch.device("cpu"), *arrays)
    treference = torch_steps.reference_token_logps(tmodel, *tensors[:3], split_head=True)
    trest = [torch.from_numpy(a) for a in (old_values, advantages, returns, carried)]
    torch_loss, torch_sums = torch_steps.rl_loss(tmodel, *tensors, treference, treference, *trest, split_head=True, rc=rc)
    torch_loss.backward()

    assert float(torch_loss) == pytest.approx(float(mlx_loss), abs=1e-5)
    assert np.abs(torch_sums.numpy() - np.array(mlx_sums)).max() < 1e-4
    worst = 0.0
    for name, p in tmodel.named_parameters():
        if p.grad is None:
            continue
        if name.startswith("value_head."):
            worst = max(worst, float(np.abs(p.grad.numpy() - mlx_grads[name]).max()))
            continue
        module, part = name.replace(".default", "").rsplit(".lora_", 1)
        mlx_grad = mlx_grads[f"{module}.lora_{part[0].lower()}"].T  # mlx-lm keeps lora_a [in, r]: PEFT's A transposed
        worst = max(worst, float(np.abs(p.grad.numpy() - mlx_grad).max()))
    print(f"{algo} loss {float(mlx_loss):.6f} on both; largest gradient difference {worst:.1e}")
    assert worst < 1e-5
    assert max(np.abs(g).max() for g in mlx_grads.values()) > 1e-3  # gradients that carry something
    if algo == "ppo":
        assert float(mlx_sums[5]) > 0 and float(mlx_sums[6]) > 0  # clipped tokens, a value loss
        assert np.abs(mlx_grads["value_head.weight"]).max() > 1e-3


# --- runs ---------------------------------------------------------------------------------------------


def tiny_config(model_dir, out, rewards_file, *extra):
    return load_config("grpo", [
        f"model.name={model_dir}", "data.k_shot=16", "data.max_valid_rows=4", "train.batch_size=2", "train.steps=4",
        "train.report_every=1", "train.warmup_steps=1", "train.learning_rate=1e-2", "train.checkpoint_every=2",
        "eval.every=2", "rl.max_completion_length=8", "rl.log_completions_every=2",
        f"rl.reward_functions=[{rewards_file}:brevity]", f"out={out}", *extra])


def rewards_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text("def brevity(prompts, completions, **kw):\n    return [-len(c) / 10 for c in completions]\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backend, algo", [("mlx", "grpo"), ("torch", "grpo"), ("mlx", "ppo"), ("torch", "ppo")])
def test_resume_after_a_kill_samples_and_reports_the_same(tiny_model_dir, tmp_path, stop_after_step, backend, algo):
    # PPO, with 2 updates per rollout: its value head must come back from the checkpoint too, or
    # the value loss and the advantages after the resume differ. The killed run also trains in
    # passes of 3 completions (8 rows: 3 + 3 + 2; PPO's 4: 3 + 1), which must not change a number:
    # the reward sums counted in every pass instead of once would multiply the reward.
    if backend == "torch":
        pytest.importorskip("peft")
    from mlxft.methods import rl

    train = partial(rl.train, backend=backend)
    functions = rewards_file(tmp_path)
    extra = ["rl.algo=ppo", "rl.num_iterations=2", "rl.num_generations=2"] if algo == "ppo" else []
    straight = tiny_config(tiny_model_dir, tmp_path / "a", functions, *extra)
    summary = train(straight, Run.create(tmp_path / "a", straight), echo=lambda *a: None)
    killed = tiny_config(tiny_model_dir, tmp_path / "b", functions, *extra, "rl.completions_per_pass=3")
    counter = stop_after_step(3)  # killed after step 3, with a checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        train(killed, Run.create(tmp_path / "b", killed), echo=lambda *a: None)
    train(killed, Run.open_for_resume(tmp_path / "b"), resume=True, echo=lambda *a: None)
    assert counter["after_stop"] == 2
    a, b = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in "ab")
    keys = ("loss", "reward", "rewards/brevity/mean", "kl", "entropy", "completions/mean_length", "eval_reward",
            *(("value_loss", "clip_ratio") if algo == "ppo" else ()))
    for key in keys:
        assert [r.get(key) for r in b] == pytest.approx([r.get(key) for r in a], rel=1e-4, abs=1e-6), key
    logged = [(tmp_path / run / "completions.jsonl").read_text() for run in "ab"]
    assert logged[0] == logged[1] and {json.loads(line)["step"] for line in logged[0].splitlines()} == {2, 4}
    assert a[0]["frac_reward_zero_std"] < 1 and any(r["grad_norm"] > 0 for r in a)  # completions differ: it learns
    assert summary["algo"] == algo and "eval_rewards/brevity/mean" in summary["after"]
    if algo == "ppo":  # the value head is trained: its loss is measured at every step
        assert all(r["value_loss"] > 0 for r in a) and (tmp_path / "b" / "checkpoint" / "heads.safetensors").exists()


@pytest.mark.slow
def test_a_reward_function_that_fails_mid_run_stops_it_with_the_checkpoint_intact(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import cli

    path = tmp_path / "flaky.py"
    path.write_text("calls = []\n\ndef flaky(prompts, completions, **kw):\n    calls.append(1)\n"
                    "    if len(calls) > 5:\n        raise RuntimeError('the grader is down')\n    return [0.0] * len(completions)\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["rl", "--recipe", "grpo", "--model", str(tiny_model_dir), "--backend", "mlx",
                                      "--out", str(out), "--set", f"rl.reward_functions=[{path}:flaky]",
                                      "--set", "train.batch_size=1", "--set", "train.checkpoint_every=2",
                                      "--set", "eval.every=0", "--set", "data.max_valid_rows=1", "--set", "train.steps=8",
                                      "--set", "rl.max_completion_length=4"])
    # Calls: 1 before training (validation), then one per step: the 6th call is step 5's.
    assert result.exit_code != 0 and "reward function flaky raised RuntimeError: the grader is down" in result.output
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4


def test_rl_mistakes_are_one_line_errors(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import cli

    runner = CliRunner()
    out = str(tmp_path / "run")
    for settings, message in [(["rl.reward_functions=[nowhere:f]"], "cannot import nowhere"),
                              (["eval.metric=loss"], "use eval.metric=reward"),
                              (["lora.full_finetune=true"], "full fine-tuning is not built for RL"),
                              (["rl.reward_weights=[1, 2]"], "has 2 weights for 1 reward; give one per reward function"),
                              (["data.source=data/alpaca-sample.json"], "RL needs rows with a 'prompt'"),
                              (["rl.num_generations=1"], "rl.algo=grpo compares completions of one prompt")]:
        result = runner.invoke(cli, ["rl", "--recipe", "grpo", "--model", str(tiny_model_dir), "--out", out,
                                     *[a for s in settings for a in ("--set", s)]])
        assert result.exit_code != 0 and message in result.output, (settings, result.output)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_reward_adapter_scores_on_the_policys_weights_as_on_its_own(tiny_model_dir, tmp_path, backend):
    # The reward model shares the policy's base weights: its adapter (r 8) is swapped into the
    # policy's LoRA layers (r 4) for the forward, and the policy's come back untouched.
    if backend == "torch":
        pytest.importorskip("peft")
    from test_parity import starting_adapter

    from mlxft.backends import engine_for
    from mlxft.data.batching import collate
    from mlxft.data.encode import Example
    from mlxft.methods import reward
    from mlxft.models.adapters import attach_adapter
    from mlxft.models.files import pad_id as pad_id_of

    config = load_config("reward", [f"model.name={tiny_model_dir}", "data.k_shot=16", "train.steps=3", "eval.every=0",
                                    "data.max_valid_rows=4", f"out={tmp_path / 'reward'}"])
    reward.train(config, Run.create(tmp_path / "reward", config), echo=lambda *a: None)
    reward_adapter = str(tmp_path / "reward" / "last")
    policy_adapter = starting_adapter(tiny_model_dir, tmp_path / "policy")

    b = engine_for(backend)
    tokenizer, own = b.load_scorer(str(tiny_model_dir), reward_adapter)
    pad_id = pad_id_of(tokenizer)
    rng = np.random.default_rng(1)
    rows = collate([Example(rng.integers(3, 200, size=n).tolist(), [1] * n) for n in (9, 5, 12)], pad_id).input_ids

    if backend == "mlx":
        model = b.model.load(str(tiny_model_dir))[0]
    else:
        import torch

        model = b.model.load(str(tiny_model_dir), device=torch.device("cpu"))[0]
    attach_adapter(b.lora, model, policy_adapter)
    before = b.lora.adapter_weights(model)
    shared = b.swapped_scorer(model, reward_adapter, pad_id)(rows)
    assert np.abs(shared - own(rows)).max() < 1e-5
    assert np.abs(shared).max() > 1e-3
    after = b.lora.adapter_weights(model)
    assert all(np.array_equal(before[p][i], after[p][i]) for p in before for i in (0, 1))  # the policy is back, bit for bit


@pytest.mark.slow
def test_rl_with_a_reward_model_alone(tiny_model_dir, tmp_path):
    from mlxft.methods import reward, rl

    config = load_config("reward", [f"model.name={tiny_model_dir}", "data.k_shot=16", "train.steps=2", "eval.every=0",
                                    "data.max_valid_rows=4", f"out={tmp_path / 'reward'}"])
    reward.train(config, Run.create(tmp_path / "reward", config), echo=lambda *a: None)
    config = tiny_config(tiny_model_dir, tmp_path / "rl", rewards_file(tmp_path), "rl.reward_functions=[]",
                         f"rl.reward_adapter={tmp_path / 'reward' / 'last'}", "train.steps=2", "eval.every=0")
    summary = rl.train(config, Run.create(tmp_path / "rl", config), echo=lambda *a: None)
    last = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["rewards/reward_model/std"] > 0 and last["reward"] == pytest.approx(last["rewards/reward_model/mean"])
    assert set(summary["after"]) == {"eval_reward", "eval_rewards/reward_model/mean", "eval_completions/mean_length"}


def test_the_llm_judge_as_a_reward(fake_judge, monkeypatch):
    from judge_server import FakeJudge

    from mlxft.rewards import judge

    FakeJudge.replies = ["<think>the sum is 12</think> 100", "Score: 40", "no idea"]
    monkeypatch.setenv("MLXFT_JUDGE_URL", fake_judge)
    monkeypatch.setenv("MLXFT_JUDGE_MODEL", "grader")
    assert judge(["What is 7 + 5?"] * 2, ["12", "13"], answer=["12", "12"]) == [1.0, 0.4]
    path, body, _ = FakeJudge.requests[0]
    assert path == "/api/chat" and body["model"] == "grader" and "Reference answer:\n12" in body["messages"][0]["content"]
    with pytest.raises(UserError, match="no score from 0 to 100"):
        judge(["q"], ["a"], answer=["b"])
    with pytest.raises(UserError, match="needs a reference answer"):
        judge(["q"], ["a"], label=["b"])
    monkeypatch.delenv("MLXFT_JUDGE_URL")
    with pytest.raises(UserError, match="needs MLXFT_JUDGE_URL"):
        judge(["q"], ["a"], answer=["b"])
