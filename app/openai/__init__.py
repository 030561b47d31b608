"""The OpenAI-compatible API: request parsing/validation, response and SSE builders."""
