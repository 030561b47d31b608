"""HTTP endpoints; each module exposes async handlers taking a Starlette Request."""
