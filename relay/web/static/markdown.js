// Markdown for model output, which is untrusted. marked turns it into HTML (raw HTML in the
// text is shown as text, not interpreted), and DOMPurify sanitizes the result before it
// reaches the page: no scripts, no event handlers, no javascript: links.
import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";

const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: { html: ({ text }) => escapeHtml(text) },
});

// Links that survived sanitizing open in a new tab, without a handle on this one.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Show a reasoning model's thinking in `details` (a <details> holding a <summary> and a
 * `.reasoning` block) as plain text, never HTML: labelled "Thinking…" while `busy` (no answer
 * yet), "Thought" after; hidden when there is none. */
export function renderThoughts(details, reasoning, busy) {
  details.hidden = !reasoning;
  if (!reasoning) return;
  details.querySelector(".reasoning").textContent = reasoning;
  details.querySelector("summary").textContent = busy ? "Thinking…" : "Thought";
}

/** Show `text` (Markdown) in `element`, replacing what was there. */
export function renderMarkdown(element, text) {
  // RETURN_TRUSTED_TYPE: the page's CSP lets only DOMPurify's policy write HTML.
  element.innerHTML = DOMPurify.sanitize(marked.parse(text), { RETURN_TRUSTED_TYPE: true });
}
