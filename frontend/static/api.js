// The public HTTP API as the playground calls it: this module is also a small example client.
// Errors come back in OpenAI's shape {"error": {"message", "type", "param", "code"}} with an HTTP status.

export class ApiError extends Error {
  /** `status` is the HTTP status (0: no answer), `code` the server's stable error code. */
  constructor(status, code, message, param = null, retryAfter = null) {
    super(message);
    Object.assign(this, { status, code, param, retryAfter });
  }
}

/** JSON request; `key` goes out as a Bearer token. Resolves to the parsed body, rejects with ApiError. */
export async function request(method, path, { body, key, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (key) headers.Authorization = `Bearer ${key}`;
  let resp;
  try {
    resp = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network_error", `Could not reach the server (${e.message}).`);
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* non-JSON body: reported below */ }
  if (!resp.ok) {
    const err = data && data.error;
    const message = (err && (typeof err === "string" ? err : err.message)) || text.slice(0, 300) || resp.statusText;
    throw new ApiError(resp.status, err && err.code, message, err && err.param, resp.headers.get("Retry-After"));
  }
  if (data === null) throw new ApiError(resp.status, "bad_response", "The server answered with something that is not JSON.");
  return data;
}

/**
 * Body of POST /v1/chat/completions for one grounding query. `imageUrl` is a data: URL (PNG, JPEG,
 * WebP); `profile` is fast | balanced | quality; `model` may be empty (the server's default model).
 */
export function groundingBody({ model, imageUrl, instruction, profile, topK }) {
  const body = {
    messages: [{ role: "user", content: [
      { type: "image_url", image_url: { url: imageUrl } },
      { type: "text", text: instruction },
    ] }],
    profile, return_attention: true, top_k: topK,
  };
  if (model) body.model = model;
  return body;
}

/**
 * Body of POST /v1/screenshots: the server keeps the screenshot's state for the questions that
 * follow with the same image, model and profile, which then run from it (usage reports cached_tokens).
 */
export function screenshotBody({ model, imageUrl, profile }) {
  const body = { image_url: { url: imageUrl }, profile };
  if (model) body.model = model;
  return body;
}
