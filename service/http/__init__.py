"""The HTTP face of a process: the Starlette app factory (``app``), the routes (``tasks``,
``uploads``, ``webhooks``, ``ops``, ``files``, ``sse``, ``docs``, ``dashboard``), how records look
on the wire (``views``), the OpenAPI document (``openapi``, ``openapi30``), what every handler does
with its request (``requests``: the caller, the visible task, the body), auth, the rate limiter,
the middleware, and the one mapping from errors to responses (``errors``).

May import anything below it (runtime, steps, media, blobs, ops, statemachine, callbacks);
nothing below imports it. Handlers reach the process's parts through ``request.state.web``
(``state.Web``: the runtime plus the HTTP-only caches and limiter).
"""
