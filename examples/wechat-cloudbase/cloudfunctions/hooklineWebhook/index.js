/**
 * hooklineWebhook: hookline's webhook, received through CloudBase HTTP access.
 *
 * Where the seed's aimodels function wrote `works.status = 'completed'`, `works.images` and
 * `task_queue.status` at the end of a 40-150 s await, hookline POSTs here when the task changes,
 * and this function writes the same fields in a few milliseconds.
 *
 * - The delivery is verified with the `standardwebhooks` package over the exact raw body (decoded
 *   from base64 when CloudBase says `isBase64Encoded`), whatever the case of the headers' names.
 *   A bad, missing or expired signature is answered 401 and changes nothing.
 * - A delivery is applied once: its `webhook-id` (the same on every retry) names a record in
 *   `hookline_deliveries`, written after the records are updated, so a delivery cut short is
 *   applied again on its retry and a delivery seen before is answered `duplicate`.
 * - Records never move back: a terminal status stays, and a delivery older than the one applied
 *   (by the task's `updated_at`) is answered `stale`, as retries may arrive out of order.
 * - A task whose `works` record is not found yet (photography stores `task_id` right after
 *   hookline's answer, a webhook may overtake it) is answered 404 so that hookline retries it.
 *
 * Answers 200 `{status: applied | duplicate | stale | ignored}`, or `{error: {code, message}}`
 * with 400, 401, 404, 405, 413 or 500; anything but 2xx is retried by hookline, and it never
 * answers 410 (which would switch the endpoint off).
 * Environment: HOOKLINE_WEBHOOK_SECRET (the `whsec_…` secret `POST /v1/webhooks` showed once).
 */

'use strict';

const crypto = require('node:crypto');
const cloud = require('wx-server-sdk');
const { Webhook, WebhookVerificationError } = require('standardwebhooks');

cloud.init({ env: cloud.DYNAMIC_CURRENT_ENV });

const WORKS = 'works';
const TASK_QUEUE = 'task_queue';
const DELIVERIES = 'hookline_deliveries';
const MAX_BODY_BYTES = 1024 * 1024;
const TERMINAL = new Set(['completed', 'failed', 'cancelled']);
const SAFE_ID = /^[A-Za-z0-9_.:-]{1,128}$/;

exports.main = async (event) => {
  try {
    return await receive(event || {});
  } catch (err) {
    console.error('hooklineWebhook failed', err);
    return reply(500, failure('internal_error', 'the delivery was not applied; it will be retried'));
  }
};

async function receive(event) {
  if (String(event.httpMethod || '').toUpperCase() !== 'POST') {
    return reply(405, failure('method_not_allowed', 'POST only'), { allow: 'POST' });
  }
  const webhook = verifier(process.env.HOOKLINE_WEBHOOK_SECRET);
  if (!webhook) {
    console.error('HOOKLINE_WEBHOOK_SECRET is not set, or is not a whsec_ secret');
    return reply(500, failure('not_configured', 'the webhook secret is not configured'));
  }
  const raw = rawBody(event);
  if (raw === null) {
    return reply(400, failure('bad_body', 'the body must reach the function as sent'));
  }
  if (raw.length > MAX_BODY_BYTES) {
    return reply(413, failure('payload_too_large', `body over ${MAX_BODY_BYTES} bytes`));
  }
  const headers = lowerCased(event.headers);
  try {
    webhook.verify(raw, headers, { jsonParse: false });
  } catch (err) {
    if (err instanceof WebhookVerificationError) {
      return reply(401, failure('bad_signature', err.message));
    }
    throw err;
  }
  const delivery = parseDelivery(raw);
  if (!delivery) {
    return reply(400, failure('malformed_body', 'signed, but not a hookline delivery'));
  }
  return apply(cloud.database(), headers['webhook-id'], delivery);
}

/** A Standard Webhooks verifier for `secret`, or null when it is missing or malformed. */
function verifier(secret) {
  if (!secret || !secret.startsWith('whsec_')) return null;
  try {
    return new Webhook(secret);
  } catch {
    return null;
  }
}

/** The request body's exact bytes, or null when CloudBase did not pass it as a string. */
function rawBody(event) {
  if (event.body === undefined || event.body === null) return Buffer.alloc(0);
  if (typeof event.body !== 'string') return null;
  return Buffer.from(event.body, event.isBase64Encoded ? 'base64' : 'utf8');
}

function lowerCased(headers) {
  const out = {};
  for (const [name, value] of Object.entries(headers || {})) {
    out[name.toLowerCase()] = Array.isArray(value) ? value.join(' ') : String(value);
  }
  return out;
}

/** `{type, task}` for a task event (`task` null for other types), or null for a malformed one. */
function parseDelivery(raw) {
  let body;
  try {
    body = JSON.parse(raw.toString('utf8'));
  } catch {
    return null;
  }
  if (!body || typeof body !== 'object' || typeof body.type !== 'string') return null;
  if (!body.type.startsWith('task.')) return { type: body.type, task: null };
  const task = body.data;
  if (!task || typeof task !== 'object' || typeof task.id !== 'string') return null;
  if (typeof task.state !== 'string') return null;
  return { type: body.type, task };
}

async function apply(db, webhookId, delivery) {
  const deliveryId = SAFE_ID.test(webhookId)
    ? webhookId
    : `h_${crypto.createHash('sha256').update(webhookId).digest('hex')}`;
  const seen = await db.collection(DELIVERIES).where({ _id: deliveryId }).get();
  if (seen.data.length) return reply(200, { status: 'duplicate' });
  const { task } = delivery;
  let work = null;
  let status = 'ignored';
  if (task) {
    const found = await db.collection(WORKS).where({ task_id: task.id }).limit(1).get();
    work = found.data[0];
    if (!work) {
      return reply(404, failure('unknown_task', `no works record has task_id ${task.id} yet`));
    }
    status = (await updateRecords(db, work, task)) ? 'applied' : 'stale';
  }
  await addOnce(db.collection(DELIVERIES), {
    _id: deliveryId,
    webhook_id: webhookId,
    type: delivery.type,
    task_id: task ? task.id : null,
    work_id: work ? work._id : null,
    status,
    received_at: db.serverDate(),
  });
  return reply(200, { status });
}

/** Write the task's state into `works` and `task_queue`; false when it would move them back. */
async function updateRecords(db, work, task) {
  if (TERMINAL.has(work.status) || olderThanApplied(work, task)) return false;
  const _ = db.command;
  const error = task.error ? { code: task.error.code, message: task.error.message } : null;
  const common = {
    status: task.state,
    // objects are merged field by field by update(); _.set replaces them whole
    error: error ? _.set(error) : null,
    task_updated_at: typeof task.updated_at === 'string' ? task.updated_at : null,
    updated_at: db.serverDate(),
  };
  const works = { ...common };
  if (task.state === 'completed') {
    const outputs = Array.isArray(task.outputs) ? task.outputs : [];
    works.images = _.set(outputs.filter((o) => o && typeof o.url === 'string').map((o) => o.url));
  }
  await db.collection(WORKS).doc(work._id).update({ data: works });
  const queued = { ...common, attempts: Number.isInteger(task.attempts) ? task.attempts : null };
  const { stats } = await db.collection(TASK_QUEUE).doc(task.id).update({ data: queued });
  if (stats && stats.updated === 0) {
    await addOnce(db.collection(TASK_QUEUE), {
      _id: task.id,
      _openid: work._openid,
      work_id: work._id,
      ...queued,
      error,
      created_at: db.serverDate(),
    });
  }
  return true;
}

function olderThanApplied(work, task) {
  if (!work.task_updated_at || typeof task.updated_at !== 'string') return false;
  return Date.parse(task.updated_at) < Date.parse(work.task_updated_at);
}

/** Add a record unless one with its `_id` exists (a concurrent delivery wrote it). */
async function addOnce(collection, record) {
  try {
    await collection.add({ data: record });
  } catch (err) {
    const { data } = await collection.where({ _id: record._id }).get();
    if (!data.length) throw err;
  }
}

function failure(code, message) {
  return { error: { code, message } };
}

function reply(statusCode, body, headers = {}) {
  return {
    statusCode,
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify(body),
    isBase64Encoded: false,
  };
}
