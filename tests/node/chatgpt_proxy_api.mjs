// Drives the `chatgpt` npm package's ChatGPTUnofficialProxyAPI (ChatGPT's web protocol, what
// chatgpt-web runs in access-token mode) against the relay's /backend-api/conversation: a
// first message with onProgress, then a follow-up by parentMessageId and conversationId.
// Usage: node chatgpt_proxy_api.mjs <relay base URL> <API key>   (prints one JSON object)
import { ChatGPTUnofficialProxyAPI } from 'chatgpt'

const api = new ChatGPTUnofficialProxyAPI({
  accessToken: process.argv[3],
  apiReverseProxyUrl: `${process.argv[2]}/backend-api/conversation`,
})

const progress = []
const first = await api.sendMessage('Hello through ChatGPT\'s web protocol', {
  onProgress: (partial) => progress.push(partial.text),
  timeoutMs: 20000,
})
const second = await api.sendMessage('And a follow-up', {
  parentMessageId: first.id,
  conversationId: first.conversationId,
  timeoutMs: 20000,
})
const turn = (m) => ({ id: m.id, text: m.text, conversationId: m.conversationId,
  parentMessageId: m.parentMessageId })
console.log(JSON.stringify({ progress, first: turn(first), second: turn(second) }))
