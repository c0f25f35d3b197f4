"""Tools for models: tool-call parsers and prompts (parser, render), ready tools (calculator, a Python sandbox) and
the environments multi-turn rollouts run them in (env)."""
