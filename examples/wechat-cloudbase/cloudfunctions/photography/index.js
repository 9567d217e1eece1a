/**
 * photography: the mini-program's "generate" call, made on hookline.
 *
 * The seed's photography wrote a `task_queue` record whose database trigger started
 * task-processor, which awaited aimodels, which awaited the AI — and died at the 60 s limit. This
 * one checks the request, writes the `works` record (status `pending`, as the seed does), creates
 * the hookline task and returns `{task_id, watch_url, work_id}` at once: it never waits for the
 * AI. hookline runs the task; its webhook (the hooklineWebhook function) updates the records.
 *
 * Called as `wx.cloud.callFunction({name: 'photography', data: {action: 'generate', requestId,
 * prompt, style, fileID | imageUrl}})`. `requestId` is made by the mini-program once per submit
 * and sent again on every retry of that submit: the `works` record id and hookline's
 * Idempotency-Key are derived from OPENID + requestId, so a retry finds the same record and the
 * same task and is never charged twice.
 *
 * The `works` record exists only while hookline holds (or may still create) its task: when hookline
 * refuses the task, or cannot be reached, the record is removed and the error returned, so no
 * record is left pending that nothing will ever complete. A record without `task_id` is an attempt
 * under way, or one cut short by the function's own death; retrying with the same requestId
 * completes it.
 *
 * Answers `{task_id, watch_url, work_id}`, or `{error: {code, message, retryable, status?}}`.
 * Environment: HOOKLINE_URL, HOOKLINE_API_KEY, HOOKLINE_TIMEOUT_MS (10000), PHOTO_DIR (photos).
 */

'use strict';

const crypto = require('node:crypto');
const cloud = require('wx-server-sdk');
const hookline = require('./hookline');

cloud.init({ env: cloud.DYNAMIC_CURRENT_ENV });

const WORKS = 'works';
const TASK_QUEUE = 'task_queue';
const REQUEST_ID = /^[A-Za-z0-9_-]{1,64}$/;
const STYLE = /^[A-Za-z0-9_-]{1,64}$/;
const MAX_PROMPT_CHARS = 2000; // hookline's default max_prompt_chars
const MAX_URL_CHARS = 2048;
const TEMP_URL_MAX_AGE_S = 86400; // long enough for hookline's retries to fetch it again

/** A refusal: returned to the caller as `{error}`, never thrown past `main`. */
class Refusal extends Error {
  constructor(code, message, { retryable = false, status } = {}) {
    super(message);
    this.code = code;
    this.retryable = retryable;
    this.status = status;
  }

  toJSON() {
    const error = { code: this.code, message: this.message, retryable: this.retryable };
    if (this.status !== undefined) error.status = this.status;
    return { error };
  }
}

exports.main = async (event = {}) => {
  try {
    const { OPENID } = cloud.getWXContext();
    if (!OPENID) {
      throw new Refusal('no_openid', 'photography must be called from the mini-program');
    }
    const action = event && event.action !== undefined ? event.action : 'generate';
    if (action !== 'generate') {
      throw new Refusal('unknown_action', `unknown action ${JSON.stringify(action)}`);
    }
    return await generate(OPENID, checkRequest(event || {}));
  } catch (err) {
    if (err instanceof Refusal) return err.toJSON();
    console.error('photography failed', err);
    return new Refusal('internal_error', 'photography failed; retry with the same requestId', {
      retryable: true,
    }).toJSON();
  }
};

/** The request's own fields, checked: `{requestId, prompt, style, source}`. */
function checkRequest(event) {
  const { requestId, prompt, style, fileID, imageUrl } = event;
  if (typeof requestId !== 'string' || !REQUEST_ID.test(requestId)) {
    throw new Refusal('bad_request_id', 'requestId must be 1-64 letters, digits, "-" or "_"');
  }
  if (typeof prompt !== 'string' || !prompt.trim()) {
    throw new Refusal('bad_prompt', 'prompt must be a non-empty string');
  }
  if (prompt.length > MAX_PROMPT_CHARS) {
    throw new Refusal('prompt_too_long', `prompt over ${MAX_PROMPT_CHARS} characters`);
  }
  if (style !== undefined && style !== null && (typeof style !== 'string' || !STYLE.test(style))) {
    throw new Refusal('bad_style', 'style must be 1-64 letters, digits, "-" or "_"');
  }
  const hasFile = fileID !== undefined && fileID !== null;
  const hasUrl = imageUrl !== undefined && imageUrl !== null;
  if (hasFile === hasUrl) {
    throw new Refusal('bad_image', 'give the photo as exactly one of fileID or imageUrl');
  }
  if (hasFile && (typeof fileID !== 'string' || !/^cloud:\/\/\S{1,1024}$/.test(fileID))) {
    throw new Refusal('bad_image', 'fileID must be a cloud storage fileID (cloud://…)');
  }
  if (hasUrl && !isHttpsUrl(imageUrl)) {
    throw new Refusal('bad_image', `imageUrl must be an https URL of at most ${MAX_URL_CHARS} characters`);
  }
  return {
    requestId,
    prompt,
    style: style || null,
    source: hasFile ? { fileID } : { imageUrl },
  };
}

function isHttpsUrl(value) {
  if (typeof value !== 'string' || value.length > MAX_URL_CHARS) return false;
  try {
    const url = new URL(value);
    return url.protocol === 'https:' && !url.username && !url.password;
  } catch {
    return false;
  }
}

async function generate(openid, request) {
  const config = hookline.readConfig();
  if (config.error) {
    console.error('photography is not configured:', config.error.message);
    throw new Refusal(config.error.code, config.error.message);
  }
  const db = cloud.database();
  const digest = crypto.createHash('sha256').update(`${openid}\n${request.requestId}`).digest('hex');
  const workId = `w_${digest.slice(0, 32)}`;
  let work = await findWork(db, workId, openid, request);
  if (work && work.task_id) {
    return answer(work); // a retry of a submit that hookline already took: no second task
  }
  if (!work) {
    work = await addWork(db, workId, openid, request);
    if (work.task_id) return answer(work);
  }
  const outcome = await hookline.createTask(config, taskBody(work), `wx-photography-${digest}`);
  if (outcome.error) {
    const { code, message, retryable, status } = outcome.error;
    // A refusal that cannot succeed on retry leaves nothing behind. After a timeout, a 5xx or a
    // 429 hookline may have created (and charged) the task: the record stays, and a retry with
    // the same requestId finishes it with the same Idempotency-Key instead of orphaning it.
    if (!retryable) await db.collection(WORKS).doc(workId).remove();
    if (status >= 500 || status === 401) console.error('the hookline task was not created', outcome.error);
    throw new Refusal(code, message, { retryable, status });
  }
  return answer(await recordTask(db, work, outcome.task));
}

/** The caller's record for this requestId, if any; the same requestId with another request is a
 * conflict, as it is for hookline's Idempotency-Key. */
async function findWork(db, workId, openid, request) {
  const { data } = await db.collection(WORKS).where({ _id: workId, _openid: openid }).get();
  const work = data[0];
  if (work && !sameRequest(work, request)) {
    throw new Refusal(
      'request_conflict',
      'this requestId was already used for another request: make a new requestId per submit',
    );
  }
  return work || null;
}

function sameRequest(work, request) {
  return (
    work.prompt === request.prompt &&
    (work.style || null) === request.style &&
    JSON.stringify(work.source) === JSON.stringify(request.source)
  );
}

/** Write the `works` record (pending, no task yet), with the photo's URL resolved once: a retry
 * sends hookline the very same body, so its Idempotency-Key replays instead of conflicting. */
async function addWork(db, workId, openid, request) {
  const work = {
    _id: workId,
    _openid: openid,
    request_id: request.requestId,
    prompt: request.prompt,
    style: request.style,
    source: request.source,
    input_url: await inputUrl(openid, request.source),
    status: 'pending',
    task_id: null,
    watch_url: null,
    images: [],
    error: null,
    created_at: db.serverDate(),
    updated_at: db.serverDate(),
  };
  try {
    await db.collection(WORKS).add({ data: work });
  } catch (err) {
    // The same submit running twice at once: go on with the record the other call wrote.
    const other = await findWork(db, workId, openid, request);
    if (!other) throw err;
    return other;
  }
  return work;
}

/** The photo as a URL hookline can fetch: a fileID in the caller's own folder becomes a temp URL. */
async function inputUrl(openid, source) {
  if (source.imageUrl) return source.imageUrl;
  const dir = (process.env.PHOTO_DIR || 'photos').replace(/^\/+|\/+$/g, '');
  const path = source.fileID.replace(/^cloud:\/\/[^/]+\//, '');
  const dotted = path.split('/').some((segment) => segment === '.' || segment === '..');
  if (!path.startsWith(`${dir}/${openid}/`) || dotted) {
    // fileIDs are not secrets and this function reads any file: only the caller's own photos
    throw new Refusal('bad_image', `fileID must name a file under ${dir}/<your OPENID>/`);
  }
  let result;
  try {
    result = await cloud.getTempFileURL({
      fileList: [{ fileID: source.fileID, maxAge: TEMP_URL_MAX_AGE_S }],
    });
  } catch (err) {
    console.error('getTempFileURL failed', err);
    throw new Refusal('storage_unavailable', 'cloud storage did not answer; retry', {
      retryable: true,
    });
  }
  const file = result && result.fileList && result.fileList[0];
  if (!file || file.status !== 0 || !file.tempFileURL) {
    throw new Refusal('image_not_found', `no such file: ${source.fileID}`);
  }
  return file.tempFileURL;
}

function taskBody(work) {
  const body = { inputs: [{ url: work.input_url }], prompt: work.prompt, num_outputs: 1 };
  if (work.style) body.style = work.style;
  return body;
}

/** Store the task: its `task_queue` record first, then `task_id` on the work — the webhook finds
 * the work by `task_id`, so by then both records exist. Neither write moves a status back. */
async function recordTask(db, work, task) {
  const watchUrl = typeof task.watch_url === 'string' ? task.watch_url : null;
  const queued = {
    _id: task.id,
    _openid: work._openid,
    work_id: work._id,
    status: task.state,
    attempts: task.attempts,
    error: null,
    created_at: db.serverDate(),
    updated_at: db.serverDate(),
  };
  await addOnce(db.collection(TASK_QUEUE), queued);
  const update = { task_id: task.id, watch_url: watchUrl, updated_at: db.serverDate() };
  const { stats } = await db.collection(WORKS).doc(work._id).update({ data: update });
  if (stats && stats.updated === 0) {
    // A concurrent call with the same requestId was refused and removed the record meanwhile.
    const { _id, ...fields } = work;
    await addOnce(db.collection(WORKS), { _id, ...fields, ...update });
  }
  return { ...work, ...update };
}

/** Add a record unless one with its `_id` exists (then the existing one stands). */
async function addOnce(collection, record) {
  try {
    await collection.add({ data: record });
  } catch (err) {
    const { data } = await collection.where({ _id: record._id }).get();
    if (!data.length) throw err;
  }
}

function answer(work) {
  return { task_id: work.task_id, watch_url: work.watch_url, work_id: work._id };
}
