/**
 * What CloudBase would be, for the tests: CloudBase itself cannot run on this machine.
 *
 * The functions use the real `wx-server-sdk` module; only the parts of it that talk to Tencent's
 * servers are replaced on that module: `cloud.database()` returns an in-memory database, and
 * `cloud.getTempFileURL()` answers from a map of fileIDs to URLs. `cloud.getWXContext()` is the
 * SDK's own, fed through the environment variables CloudBase sets (`callAs`).
 *
 * The database does what the functions' calls do on CloudBase: `collection(name).add({data})`
 * (refusing a taken `_id`), `where(query).limit(n).get()` (equality on top-level fields),
 * `doc(id).get()`, `doc(id).update({data})` (objects merged field by field, as CloudBase does,
 * and refused over a null field as MongoDB refuses; `db.command.set(v)` replaces),
 * `doc(id).set({data})`, `doc(id).remove()`, `db.serverDate()`. Records are copied in and out, so
 * a test sees only what was written.
 */

'use strict';

const { isDeepStrictEqual } = require('node:util');
const zlib = require('node:zlib');

class ServerDate {}

class SetCommand {
  constructor(value) {
    this.value = value;
  }
}

function cloudError(errCode, errMsg) {
  return Object.assign(new Error(errMsg), { errCode, errMsg });
}

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype;
}

/** A value as stored: server dates resolved, copied; commands are refused outside update(). */
function stored(value, now) {
  if (value instanceof ServerDate) return new Date(now);
  if (value instanceof SetCommand) throw cloudError(-502001, 'commands are allowed only in update()');
  if (value instanceof Date) return new Date(value.getTime());
  if (Array.isArray(value)) return value.map((v) => stored(v, now));
  if (isPlainObject(value)) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, stored(v, now)]));
  }
  return value;
}

function merge(target, patch, now, path) {
  for (const [key, value] of Object.entries(patch)) {
    const where = path ? `${path}.${key}` : key;
    if (value instanceof SetCommand) {
      target[key] = stored(value.value, now);
    } else if (isPlainObject(value)) {
      if (!(key in target)) target[key] = {};
      if (!isPlainObject(target[key])) {
        throw cloudError(
          -502001,
          `Cannot create field in element {${where}: ${JSON.stringify(target[key])}}`,
        );
      }
      merge(target[key], value, now, where);
    } else {
      target[key] = stored(value, now);
    }
  }
}

class Query {
  constructor(collection, query, limit = 100) {
    this.collection = collection;
    this.query = query;
    this.max = limit;
  }

  limit(n) {
    return new Query(this.collection, this.query, n);
  }

  async get() {
    const matches = [...this.collection.records.values()].filter((record) =>
      Object.entries(this.query).every(([k, v]) => isDeepStrictEqual(record[k], v)),
    );
    return { data: matches.slice(0, this.max).map((r) => stored(r)), errMsg: 'collection.get:ok' };
  }
}

class Document {
  constructor(collection, id) {
    this.collection = collection;
    this.id = id;
  }

  async get() {
    const record = this.collection.records.get(this.id);
    if (!record) {
      throw cloudError(-502004, `document.get:fail document with _id ${this.id} does not exist`);
    }
    return { data: stored(record), errMsg: 'document.get:ok' };
  }

  async update({ data }) {
    const record = this.collection.records.get(this.id);
    if (!record) return { stats: { updated: 0 }, errMsg: 'document.update:ok' };
    if ('_id' in data) throw cloudError(-502001, 'update cannot change _id');
    const next = stored(record);
    merge(next, data, Date.now(), '');
    this.collection.records.set(this.id, next);
    return { stats: { updated: 1 }, errMsg: 'document.update:ok' };
  }

  async set({ data }) {
    const existed = this.collection.records.has(this.id);
    const { _id, ...fields } = data;
    this.collection.records.set(this.id, { _id: this.id, ...stored(fields, Date.now()) });
    return { _id: this.id, stats: { updated: existed ? 1 : 0, created: existed ? 0 : 1 } };
  }

  async remove() {
    const removed = this.collection.records.delete(this.id) ? 1 : 0;
    return { stats: { removed }, errMsg: 'document.remove:ok' };
  }
}

class Collection {
  constructor(name) {
    this.name = name;
    this.records = new Map();
    this.nextId = 1;
  }

  async add({ data }) {
    const id = data._id === undefined ? `auto_${this.nextId++}` : data._id;
    if (this.records.has(id)) {
      throw cloudError(
        -502001,
        `collection.add:fail -502001 database request fail. E11000 duplicate key error collection: ${this.name} dup key: { _id: "${id}" }`,
      );
    }
    this.records.set(id, { ...stored(data, Date.now()), _id: id });
    return { _id: id, errMsg: 'collection.add:ok' };
  }

  where(query) {
    return new Query(this, query);
  }

  doc(id) {
    return new Document(this, id);
  }
}

class MemoryDatabase {
  constructor() {
    this.collections = new Map();
    this.command = { set: (value) => new SetCommand(value) };
  }

  collection(name) {
    if (!this.collections.has(name)) this.collections.set(name, new Collection(name));
    return this.collections.get(name);
  }

  serverDate() {
    return new ServerDate();
  }

  /** Every record of `name`, copied: for assertions. */
  records(name) {
    return [...this.collection(name).records.values()].map((r) => stored(r));
  }

  /** Every record of every collection that has one, copied: to show that a call changed nothing. */
  snapshot() {
    const names = [...this.collections.keys()].filter((n) => this.collection(n).records.size);
    return Object.fromEntries(names.sort().map((n) => [n, this.records(n)]));
  }
}

/** Replace the SDK's database and temp-URL calls on `cloud`; `files` maps fileID → URL. */
function installCloudBase(cloud) {
  const db = new MemoryDatabase();
  const files = new Map();
  const original = { database: cloud.database, getTempFileURL: cloud.getTempFileURL };
  cloud.database = () => db;
  cloud.getTempFileURL = async ({ fileList }) => ({
    fileList: fileList.map((item) => {
      const fileID = typeof item === 'string' ? item : item.fileID;
      const url = files.get(fileID);
      return url
        ? { fileID, tempFileURL: url, status: 0, errMsg: 'ok', maxAge: item.maxAge || 7200 }
        : { fileID, tempFileURL: '', status: -503003, errMsg: 'STORAGE_FILE_NONEXIST' };
    }),
    errMsg: 'getTempFileURL:ok',
  });
  return {
    db,
    files,
    restore() {
      Object.assign(cloud, original);
    },
  };
}

/** Call `main(event)` as the mini-program user `openid` would (OPENID through the environment
 * variables CloudBase sets for one invocation). The context is read as the call starts. */
function callAs(openid, main, event) {
  const names = ['WX_CONTEXT_KEYS', 'WX_OPENID', 'WX_APPID'];
  const saved = Object.fromEntries(names.map((name) => [name, process.env[name]]));
  process.env.WX_CONTEXT_KEYS = 'WX_OPENID,WX_APPID';
  process.env.WX_OPENID = openid;
  process.env.WX_APPID = 'wx0000000000000000';
  try {
    return main(event, {});
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

/** A real PNG of `width` × `height` (one colour), made without any image library. */
function png(width = 64, height = 48, rgb = [0, 128, 128]) {
  const row = Buffer.concat([Buffer.from([0]), Buffer.alloc(width * 3).map((_, i) => rgb[i % 3])]);
  const pixels = zlib.deflateSync(Buffer.concat(Array.from({ length: height }, () => row)));
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 2, 0, 0, 0], 8); // 8-bit RGB
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', header),
    chunk('IDAT', pixels),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

function chunk(type, data) {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([length, body, crc]);
}

function crc32(bytes) {
  let crc = 0xffffffff;
  for (const byte of bytes) {
    crc ^= byte;
    for (let k = 0; k < 8; k++) crc = (crc >>> 1) ^ (0xedb88320 & -(crc & 1));
  }
  return (crc ^ 0xffffffff) >>> 0;
}

module.exports = { MemoryDatabase, callAs, installCloudBase, png };
