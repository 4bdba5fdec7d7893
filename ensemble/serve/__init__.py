"""``atoll serve``: the ensemble behind OpenAI's chat-completions API.

Two backends behind one application (:mod:`ensemble.serve.app`):

* **in-process** (default): the ensemble loaded here (:mod:`ensemble.serve.engine`). Top-1
  requests decode in one running batch that requests join at the next decoding step and
  leave as soon as they are done (continuous batching,
  :class:`ensemble.running_batch.RunningBatch`); mixtures (``top_k`` > 1, an extension
  field) and the posterior router are gathered for a short window and run as batched
  ``RoutedEnsemble.generate_tokens`` calls.
* **forwarding** (``--backend openai``): the CLIP router here, each request forwarded to
  its top-1 expert's own OpenAI-compatible server (:mod:`ensemble.serve.forward`).

Every answer names the experts that routed it (``routing``: experts and weights). Images
arrive as ``data:`` URLs or ``file://`` paths under ``--image-root``; remote URLs are never
fetched. Errors are OpenAI-shaped: ``{"error": {"message", "type", "code", "param"}}``.

Example::

    atoll serve --ensemble llava-atoll --listen 127.0.0.1:8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="atoll",
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
            {"type": "text", "text": "What is on the mat?"},
        ]}],
        max_tokens=32, temperature=0, extra_body={"top_k": 2},
    )
    print(reply.choices[0].message.content, reply.model_extra["routing"])
"""
