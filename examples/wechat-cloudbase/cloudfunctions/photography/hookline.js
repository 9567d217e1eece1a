/**
 * The one hookline call photography makes: create a task, with an Idempotency-Key.
 *
 * Every outcome is returned, never thrown: `{task}` on 202, or `{error: {code, message, status,
 * retryable}}` for a refusal (hookline's own `{"error": {"code", "message"}}` body), an answer
 * that is not hookline's, a timeout or an unreachable server. `retryable` says whether the same
 * request may succeed later (5xx, 429, the network); a 4xx other than 429 will be refused again.
 */

'use strict';

const DEFAULT_TIMEOUT_MS = 10000;

/** HOOKLINE_URL, HOOKLINE_API_KEY and HOOKLINE_TIMEOUT_MS, checked; `{error}` when one is bad. */
function readConfig(env = process.env) {
  const url = (env.HOOKLINE_URL || '').trim().replace(/\/+$/, '');
  const apiKey = (env.HOOKLINE_API_KEY || '').trim();
  const timeoutMs = env.HOOKLINE_TIMEOUT_MS ? Number(env.HOOKLINE_TIMEOUT_MS) : DEFAULT_TIMEOUT_MS;
  if (!/^https?:\/\/[^/\s]+/.test(url)) {
    return { error: notConfigured('HOOKLINE_URL must be the http(s) base URL of hookline') };
  }
  if (!apiKey) {
    return { error: notConfigured('HOOKLINE_API_KEY is not set') };
  }
  if (!Number.isInteger(timeoutMs) || timeoutMs < 100) {
    return { error: notConfigured('HOOKLINE_TIMEOUT_MS must be an integer number of ms >= 100') };
  }
  return { url, apiKey, timeoutMs };
}

function notConfigured(message) {
  return { code: 'not_configured', message, status: 500, retryable: false };
}

/** POST /v1/tasks; `body` is the task request, `idempotencyKey` 1-200 characters. */
async function createTask(config, body, idempotencyKey) {
  let response;
  try {
    response = await fetch(`${config.url}/v1/tasks`, {
      method: 'POST',
      headers: {
        authorization: `Bearer ${config.apiKey}`,
        'content-type': 'application/json',
        'idempotency-key': idempotencyKey,
      },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(config.timeoutMs),
    });
  } catch (err) {
    const timedOut = err && (err.name === 'TimeoutError' || err.name === 'AbortError');
    return {
      error: {
        code: timedOut ? 'hookline_timeout' : 'hookline_unreachable',
        message: timedOut
          ? `hookline did not answer within ${config.timeoutMs} ms`
          : `hookline could not be reached: ${(err && err.cause && err.cause.code) || err}`,
        status: 503,
        retryable: true,
      },
    };
  }
  const text = await response.text();
  const json = parseJson(text);
  if (response.status === 202 && json && typeof json.id === 'string') {
    return { task: json };
  }
  return { error: refusal(response.status, json, text) };
}

function refusal(status, json, text) {
  const retryable = status >= 500 || status === 429;
  const error = json && typeof json.error === 'object' && json.error;
  if (error && typeof error.code === 'string' && typeof error.message === 'string') {
    return { code: error.code, message: error.message, status, retryable };
  }
  return {
    code: 'hookline_error',
    message: `hookline answered ${status}: ${text.slice(0, 200)}`,
    status,
    retryable,
  };
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

module.exports = { createTask, readConfig };
