"""Training one expert on its shard: the child process the site agent supervises.

The pieces, in the order a run uses them:

* :mod:`~protocol.recipe`: the YAML recipe, validated once into typed settings;
* :mod:`~site_agent.training.data`: the shard manifest, image verification (sha256), chat
  template rendering with answer-only labels, batching;
* :mod:`~site_agent.training.schedule`: ``match-dense-steps``, the paper's compute matching;
* :mod:`~site_agent.training.model`: the base model and processor (tiny from config, or a local
  Hugging Face directory), freezing;
* :mod:`~site_agent.training.parallelize`: device, bf16, LoRA (peft), DeepSpeed;
* :mod:`~site_agent.training.trainer`: the Hugging Face Trainer run, resumable, with JSON-line
  progress, ending in ``save_pretrained``.

Example (a tiny LLaVA on CPU, from a shard the partitioner wrote)::

    python -m site_agent.training --recipe configs/tiny-cpu.yaml \\
        --shard plan/expert-0.json --image-root data/images --output runs/expert-0 --resume

Standard output then carries one JSON object per line, e.g.::

    {"event": "progress", "time": 1767225600.0, "step": 12, "total_steps": 24, "loss": 4.1,
     "learning_rate": 0.0005, "tokens_per_second": 5100.0, "eta_seconds": 9.5, "epoch": 1.5,
     "tokens_seen": 51200}

and ``runs/expert-0/model`` loads with ``LlavaForConditionalGeneration.from_pretrained``.
"""

__all__: list[str] = []
