// Drives the `chatgpt` npm package's ChatGPTAPI against the relay, as chatgpt-web's back end
// does: sendMessage with onProgress, then follow-ups by parentMessageId (three turns in all).
// Usage: node chatgpt_api.mjs <relay base URL> [API key]   (prints one JSON object)
import { ChatGPTAPI } from 'chatgpt'

const base = process.argv[2]
const api = new ChatGPTAPI({
  apiKey: process.argv[3] ?? 'unused-by-the-relay',
  apiBaseUrl: `${base}/v1`,
  completionParams: { model: 'simulator' },
})

const progress = []
const first = await api.sendMessage('Hello from the chatgpt package', {
  onProgress: (partial) => progress.push(partial.text),
  timeoutMs: 20000,
})
const second = await api.sendMessage('A follow-up', {
  parentMessageId: first.id,
  timeoutMs: 20000,
})
const third = await api.sendMessage('A third turn', {
  parentMessageId: second.id,
  timeoutMs: 20000,
})
const turn = (m) => ({ id: m.id, text: m.text, parentMessageId: m.parentMessageId })
console.log(JSON.stringify({
  progress,
  first: turn(first),
  second: turn(second),
  third: turn(third),
  finishReason: first.detail?.choices?.[0]?.finish_reason ?? null,
}))
