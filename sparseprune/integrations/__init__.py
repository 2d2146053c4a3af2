"""Integrations with other systems (serving engines). Each depends on the core; the core never
imports them. ``sharding`` slices packed weights for tensor parallelism (no engine needed);
``vllm`` is the vLLM plugin, loaded by vLLM through the ``vllm.general_plugins`` entry point."""
