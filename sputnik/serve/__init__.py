"""An OpenAI/DeepSeek-compatible HTTP server: request models, SSE framing, API keys and rate limits."""
