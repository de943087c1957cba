"""The client dialects the gateway speaks. Each package holds its request shapes, their translation
into a dialect-neutral `cortex.dispatch.JobDraft`, the rendering of relay outcomes (bodies and SSE
framing), its error shape and its routes. Nothing here picks a status: `cortex.errors` does."""
