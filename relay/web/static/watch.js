// The read-only live view of one reply (/watch/<job id>). It follows the job's events from
// the start, so a late visitor sees the whole text, and across a dropped connection relies on
// the browser's EventSource reconnect: the relay resumes right after Last-Event-ID, so the text
// is only ever appended to, never reset.
import { renderMarkdown, renderThoughts } from "./markdown.js";
import { followJob } from "./stream.js";

const jobId = document.body.dataset.jobId;
const reply = document.getElementById("reply");
const thinking = document.getElementById("thinking"); // a reasoning model's thinking
const badge = document.getElementById("status");
const problem = document.getElementById("problem");
const article = reply.closest(".msg");

let text = "";
let reasoning = "";
let finishReason = null;
let error = null;
let frame = 0;

function setStatus(status, label = status) {
  badge.dataset.status = status;
  badge.textContent = label;
  article.classList.toggle("streaming", ["connecting", "live", "reconnecting"].includes(status));
}

function draw() {
  cancelAnimationFrame(frame);
  frame = 0;
  renderMarkdown(reply, text);
  renderThoughts(thinking, reasoning, article.classList.contains("streaming") && !text);
}

// The share link's read token (?token=...) is what grants watching: the job id alone does not.
const token = new URLSearchParams(location.search).get("token") ?? "";
followJob(`/v1/jobs/${encodeURIComponent(jobId)}/events?token=${encodeURIComponent(token)}`, {
  reasoning(delta) {
    if (!reasoning && !text) thinking.open = true;
    reasoning += delta;
    frame ||= requestAnimationFrame(draw);
  },
  text(delta) {
    if (!text && reasoning) thinking.open = false; // the answer starts
    text += delta;
    frame ||= requestAnimationFrame(draw);
  },
  finish(reason) {
    finishReason = reason;
  },
  error(failure) {
    error = failure;
  },
  state(state) {
    setStatus(state, state === "reconnecting" ? "reconnecting…" : state);
  },
  done() {
    if (error) {
      setStatus("failed");
      problem.textContent = error.message || "The reply failed.";
      problem.hidden = false;
    } else {
      setStatus(finishReason === "cancelled" ? "cancelled" : "finished");
    }
    draw(); // after the status: the reasoning's label says the thinking is over
  },
});
