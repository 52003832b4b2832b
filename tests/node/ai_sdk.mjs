// Drives the Vercel AI SDK's OpenAI-compatible provider (`streamText` and `generateText` from
// `ai`, as Chatbox and many Next.js chat front ends do) against the relay: a streamed reply, the
// same request unstreamed, a reply whose upstream fails mid-stream, and a wrong key.
// Usage: node ai_sdk.mjs <relay base URL> <API key> <model>   (prints one JSON object)
import { createOpenAICompatible } from '@ai-sdk/openai-compatible'
import { generateText, streamText } from 'ai'

const [base, key, model] = process.argv.slice(2)
const relay = (apiKey) =>
  createOpenAICompatible({ name: 'relay', baseURL: `${base}/v1`, apiKey, includeUsage: true })

/** Read a streamText result to its end: the text deltas, the errors, how it finished. */
async function stream(provider, prompt, simulator) {
  const errors = []
  const result = streamText({
    model: provider(model),
    prompt,
    maxRetries: 0,
    // The relay passes parameters it does not know on: these steer the test upstream.
    providerOptions: simulator ? { relay: { simulator } } : undefined,
    onError: () => {}, // reported as the stream's error parts below
  })
  const deltas = []
  let finish = null // the stream's last part, unless it failed before any output
  for await (const part of result.fullStream) {
    if (part.type === 'text-delta') deltas.push(part.text)
    if (part.type === 'error') errors.push(part.error)
    if (part.type === 'finish') finish = part
  }
  return {
    deltas,
    text: deltas.join(''),
    finishReason: finish?.finishReason ?? null,
    usage: finish?.totalUsage ?? null,
    errors: errors.map((e) => ({ message: e?.message ?? String(e), code: e?.code ?? null,
                                  status: e?.statusCode ?? null })),
  }
}

const provider = relay(key)
const streamed = await stream(provider, 'Hello through the AI SDK')
const whole = await generateText({ model: provider(model), prompt: 'Unstreamed', maxRetries: 0 })
const broken = await stream(provider, 'Fail after a few chunks', { fail: 'error_after', fail_after: 4 })
const refused = await stream(relay('not-a-key'), 'With a wrong key')
console.log(JSON.stringify({
  streamed,
  whole: { text: whole.text, finishReason: whole.finishReason, usage: whole.usage },
  broken,
  refused,
}))
