"""``accel bench``: ado's SFTTrainer experiments (full, LoRA, GPTQ-LoRA, prompt tuning,
stability) run locally on accel's trainer, one process per run, results resumable, reported,
plotted and comparable. Modules, one job each:

- :mod:`.scenario`: scenario files, the entity space, the reference's is_valid rules;
- :mod:`.datasets`: the artificial datasets (reference ids, cached, deterministic);
- :mod:`.models`: the models ``model_name`` builds (and their GPTQ checkpoints);
- :mod:`.executor` / :mod:`.worker`: one run in its own process, its outcome and properties;
- :mod:`.sampler`: CPU, memory and GPU sampling in the background;
- :mod:`.store`: results.jsonl / results.csv, resume;
- :mod:`.report`, :mod:`.plot`, :mod:`.compare`: markdown, PNG, regressions.

Nothing heavy is imported here.
"""
