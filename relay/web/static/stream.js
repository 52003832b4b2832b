// Follow one job's event stream. Each SSE `data` is an OpenAI chat.completion.chunk (or an
// error chunk); the last one is `[DONE]`, after which the EventSource must be closed, or the
// browser would reconnect. On a dropped connection the browser reconnects by itself and sends
// Last-Event-ID, and the relay resumes right after it: deltas are never repeated.

/** Same-origin path of an events URL (the relay's absolute URL may name another scheme or
 * host when it sits behind a proxy; the page's CSP allows only its own origin). */
export const samePath = (url) => {
  const parsed = new URL(url, location.href);
  return parsed.pathname + parsed.search;
};

/**
 * @param {string} url the job's events URL
 * @param {object} on callbacks: text(delta), reasoning(delta) (a reasoning model's thinking,
 *   streamed before its answer), finish(reason), error({message, code}),
 *   done() once at the end (after [DONE] or a fatal error), state("live" | "reconnecting")
 * @param {object} options `giveUp`: treat a failure before any event as fatal (the chat page)
 *   instead of waiting for the browser's reconnect (the watch page)
 * @returns {{close: () => void}} a handle to stop following
 */
export function followJob(url, on, { giveUp = false } = {}) {
  const source = new EventSource(samePath(url));
  let received = false;
  let closed = false;

  const close = () => {
    if (closed) return;
    closed = true;
    source.close();
    on.done?.();
  };

  source.onopen = () => on.state?.("live");
  source.onmessage = (event) => {
    received = true;
    if (event.data === "[DONE]") return close();
    let chunk;
    try {
      chunk = JSON.parse(event.data);
    } catch {
      return on.error?.({ message: "The relay sent an event that is not JSON." });
    }
    if (chunk.error) return on.error?.(chunk.error);
    const choice = chunk.choices?.[0];
    // llama.cpp, vLLM and DeepSeek name the thinking reasoning_content; Ollama, OpenRouter reasoning.
    const thought = choice?.delta?.reasoning_content ?? choice?.delta?.reasoning;
    if (typeof thought === "string" && thought) on.reasoning?.(thought);
    if (choice?.delta?.content) on.text?.(choice.delta.content);
    if (choice?.finish_reason) on.finish?.(choice.finish_reason);
  };
  source.onerror = () => {
    if (closed) return;
    if (source.readyState === EventSource.CLOSED) {
      // Not a network error: the relay answered with something other than an event stream.
      on.error?.({ message: "The relay refused the reply's event stream (unknown or expired job?)." });
      close();
    } else if (giveUp && !received) {
      on.error?.({ message: "Could not reach the relay to follow the reply." });
      close();
    } else {
      on.state?.("reconnecting"); // the browser retries and resumes after Last-Event-ID
    }
  };
  // Closing from outside (a new chat, leaving the page) ends quietly, without `done`.
  return {
    close() {
      closed = true;
      source.close();
    },
  };
}
