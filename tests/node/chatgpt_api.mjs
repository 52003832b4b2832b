// Drives the `chatgpt` npm package's ChatGPTAPI against the relay, as chatgpt-web's back end
// does: sendMessage with onProgress, then a follow-up by parentMessageId.
// Usage: node chatgpt_api.mjs <relay base URL>   (prints one JSON object)
import { ChatGPTAPI } from 'chatgpt'

const base = process.argv[2]
const api = new ChatGPTAPI({
  apiKey: 'unused-by-the-relay',
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
console.log(JSON.stringify({
  progress,
  first: { id: first.id, text: first.text, parentMessageId: first.parentMessageId },
  second: { id: second.id, text: second.text, parentMessageId: second.parentMessageId },
  finishReason: first.detail?.choices?.[0]?.finish_reason ?? null,
}))
