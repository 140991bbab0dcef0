"""Generation through a server process: the built-in server, one client, launching and weight sync.

* ``server`` / ``engine`` / ``sampling`` / ``protocol``: the built-in vLLM-compatible server.
* ``client``: ``RolloutClient`` for the built-in server, vLLM and SGLang.
* ``launch``: ``ServerConfig`` and ``ManagedServer`` (start, health, stop, restart, attach).
* ``weight_sync``: push a trainer's HF folder to the servers and verify what they serve.
* ``weights``: reading checkpoint folders and the weights checksum both sides compare.

Nothing is imported here so that ``python -m grpo_lightning.inference.server`` starts fast.
"""
