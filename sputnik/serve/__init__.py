"""An OpenAI/DeepSeek-compatible HTTP server: request models, reasoning splitting, API keys and rate limits."""
