"""
Time TRL's GRPOTrainer on the project's step shape: SmolLM2-135M-Instruct, float32, CPU,
2 prompts x 8 rollouts = 16 completions per optimizer step, up to 200 new tokens, beta 0.

    experiments/trl/.venv/bin/python experiments/trl/trl_step.py [--tokens 200] [--steps 3]

Prompts: export_prompts.py, run with the PROJECT's venv, writes the user messages of one project
step (train.sample_batch with random.Random(0), as bench.py); TRL gets them in conversational form
and renders them with the same chat template (checked below). Model: the project's float32 cache
(~/.cache/gradient-routing/smollm2-135m-instruct, a plain transformers directory).

Per optimizer step: step_s (on_step_begin -> on_step_end: generate, reward, forward/backward of
both micro-batches, AdamW), gen_s (TRL's generate call, clocked by overriding _generate_single_turn;
TRL's own profiling timings only go to wandb/mlflow/trackio), completion tokens (up to and including
the first EOS, as the project's completion_mask counts them) and gen_tok_s. One JSON line per step,
then a summary: medians over the steps after the first (warm-up).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOConfig, GRPOTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("GR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gradient-routing"))
MODEL_DIR = os.path.join(CACHE, "smollm2-135m-instruct")


def export_prompts(prompts, group_size):
    """The project's prompts, from export_prompts.py under the project's own venv."""
    out = os.path.join(tempfile.mkdtemp(), "prompts.json")
    subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"), os.path.join(HERE, "export_prompts.py"), out,
                    "--prompts", str(prompts), "--group-size", str(group_size)], check=True, cwd=ROOT)
    with open(out) as f:
        return json.load(f)["prompts"]


def cpu_s():
    """(busy CPU-seconds of the machine from /proc/stat, CPU-seconds of this process): as bench.py's cpu_s."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:8]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK"), sum(os.times()[:4])


def length_reward(completions, **kw):
    """Cheap and varied within a group, so every group has non-zero advantages (grading is not compared)."""
    return [len(c if isinstance(c, str) else c[-1]["content"]) / 1000 for c in completions]


class TimedGRPO(GRPOTrainer):
    """GRPOTrainer with its generate call clocked."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gen_log = []

    def _generate_single_turn(self, prompt_ids, *args, **kw):
        t0 = time.perf_counter()
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kw)
        self.gen_log.append({"gen_s": time.perf_counter() - t0, "rows": len(completion_ids),
                             "tokens": sum(len(c) for c in completion_ids),
                             "prompt_tokens": sorted({len(p) for p in prompt_ids})})
        return completion_ids, logprobs


class StepClock(TrainerCallback):
    """Wall time of each optimizer step; prints one JSON line per step when TRL logs it."""

    def __init__(self, trainer):
        self.trainer, self.rows, self.t0, self.g0, self.cpu0 = trainer, [], None, 0, None

    def on_step_begin(self, args, state, control, **kw):
        self.t0, self.g0, self.cpu0 = time.perf_counter(), len(self.trainer.gen_log), cpu_s()

    def on_step_end(self, args, state, control, **kw):
        step_s, gens = time.perf_counter() - self.t0, self.trainer.gen_log[self.g0:]
        gen_s, tokens = sum(g["gen_s"] for g in gens), sum(g["tokens"] for g in gens)
        (busy, own), (busy0, own0) = cpu_s(), self.cpu0  # CPU share other processes took (timings unreliable > 0.1)
        self.rows.append({"step": state.global_step, "step_s": step_s, "gen_s": gen_s, "train_s": step_s - gen_s,
                          "completions": sum(g["rows"] for g in gens), "completion_tokens": tokens,
                          "gen_tok_s": tokens / gen_s if gen_s else None, "generate_calls": len(gens),
                          "prompt_tokens": sorted({n for g in gens for n in g["prompt_tokens"]}),
                          "others_cpu_frac": (busy - busy0 - own + own0) / step_s / os.cpu_count()})

    def on_log(self, args, state, control, logs=None, **kw):
        if self.rows and "completions/mean_length" in (logs or {}):
            r = self.rows[-1]
            r.update(trl_mean_length=logs["completions/mean_length"], trl_step_time=logs.get("step_time"),
                     loss=logs.get("loss"), reward=logs.get("reward"))
            print(json.dumps(r), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200, help="max_completion_length (the project's bench --tokens)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps; the first is warm-up")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--micro", type=int, default=8, help="rollouts per forward/backward (the project's --micro)")
    a = ap.parse_args()
    B = a.prompts * a.group_size
    assert B % a.micro == 0, "--micro must divide prompts x group-size"

    rows = export_prompts(a.prompts, a.group_size)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    for r in rows:  # TRL renders the conversational prompt; it must be the project's string
        msgs = [{"role": "user", "content": r["user"]}]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == r["text"], r["id"]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["user"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(), report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=0,
        max_steps=a.steps, learning_rate=1e-6, gradient_checkpointing=False,  # the project's default too
        beta=0.0, num_generations=a.group_size, max_completion_length=a.tokens, temperature=1.0,
        per_device_train_batch_size=a.micro, gradient_accumulation_steps=B // a.micro,  # one step = B rollouts
        loss_type="dr_grpo", scale_rewards="none",  # the project's Dr.GRPO loss and advantages
    )
    trainer = TimedGRPO(model=model, reward_funcs=length_reward, args=cfg, train_dataset=data, processing_class=tok)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)  # our JSON lines replace the printed log dicts
    clock = StepClock(trainer)
    trainer.add_callback(clock)
    trainer.train()

    after = clock.rows[1:] or clock.rows
    keys = ("step_s", "gen_s", "train_s", "completion_tokens", "others_cpu_frac")
    med = {k: statistics.median(r[k] for r in after) for k in keys}
    summary = {"summary": "trl", "trl": trl.__version__, "transformers": transformers.__version__,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(model.dtype)[6:],
               "B": B, "prompts": a.prompts, "group_size": a.group_size, "micro": a.micro,
               "max_completion_length": a.tokens, "steps_measured": len(after),
               "prompt_tokens_project": [r["n_tokens"] for r in rows],
               "prompt_tokens_trl": clock.rows[-1]["prompt_tokens"], **med,
               "gen_tok_s": med["completion_tokens"] / med["gen_s"],
               "gen_tok_s_median": statistics.median(r["gen_tok_s"] for r in after)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
