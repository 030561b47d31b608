"""The engine core as its own process: the control layer and the executor behind a socket, served to any number
of front-end processes (HTTP, SSE, detokenisation, the Wasm runtime) that reach it through RemoteControl.

messages.py is the wire format, server.py the core's side, client.py the front end's, process.py starts one."""
