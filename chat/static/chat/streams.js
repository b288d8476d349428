// Streaming assistant replies (protocol §14): the `assistant_delta` frames of the answers
// being written, and what of them may be shown. No DOM here: the page shows and removes a
// stream's partial text through the `show` and `drop` callbacks.
//
// The rules: a stream is shown only if its index 0 was seen (a page that joins mid-stream
// waits for the stored message); deltas are appended in index order, only the one right after
// the last (a repeat or a late one is ignored); a gap (an index beyond the next) drops the
// partial text, and so does a stream no frame of which arrived for the idle timeout
// (`stream_idle_timeout` of connection_ack.server_info). The stored message that names the
// stream (`metadata.stream_id`) ends it (`finish`): the page puts it where the partial text
// was. A stream that ended, one way or the other, is never shown again.

export const DEFAULT_IDLE_TIMEOUT_S = 30;
const MAX_IDLE_TIMEOUT_S = 3600;
// Streams that ended, remembered so that a late or repeated frame of one does not start it
// again (oldest forgotten first).
const ENDED_KEPT = 500;
const KINDS = new Set(["reply", "analysis"]);

// The idle timeout in ms from the server's `stream_idle_timeout` (seconds), or the default.
export function idleTimeoutMs(seconds) {
  const valid = typeof seconds === "number" && Number.isFinite(seconds) && seconds > 0;
  return (valid ? Math.min(seconds, MAX_IDLE_TIMEOUT_S) : DEFAULT_IDLE_TIMEOUT_S) * 1000;
}

function isDelta(frame) {
  return (
    typeof frame?.stream_id === "string" &&
    frame.stream_id !== "" &&
    KINDS.has(frame.kind) &&
    Number.isSafeInteger(frame.index) &&
    frame.index >= 0 &&
    typeof frame.delta === "string"
  );
}

export class AssistantStreams {
  // show(stream): the stream's text grew (the first time: it started); drop(stream, why):
  // its partial text is to go ("gap", "idle", or what `end` was told). A stream is
  // {id, kind, roomId, inReplyTo, startedAt, index, text, view}; `view` is the page's own.
  constructor({ show, drop, idleMs = idleTimeoutMs() }) {
    this.show = show;
    this.drop = drop;
    this.idleMs = idleMs;
    this.live = new Map(); // stream id → the stream being shown
    this.ended = new Set(); // stream ids
  }

  // One `assistant_delta` frame.
  receive(frame) {
    if (!isDelta(frame) || this.ended.has(frame.stream_id)) return;
    let stream = this.live.get(frame.stream_id);
    if (stream === undefined) {
      if (frame.index !== 0) return; // joined mid-stream: the stored message will do
      stream = {
        id: frame.stream_id,
        kind: frame.kind,
        roomId: frame.room_id ?? null,
        inReplyTo: frame.in_reply_to ?? null,
        startedAt: frame.timestamp,
        index: -1,
        text: "",
        timer: null,
        view: null,
      };
      this.live.set(stream.id, stream);
    }
    this.watch(stream);
    if (frame.index <= stream.index) return; // a repeat, or late
    if (frame.index !== stream.index + 1) {
      this.end(stream, "gap");
      return;
    }
    stream.index = frame.index;
    stream.text += frame.delta;
    this.show(stream);
  }

  // The live streams of this kind.
  streams(kind) {
    return [...this.live.values()].filter((stream) => stream.kind === kind);
  }

  // The stored message of stream `id` arrived: the stream ends; returned if it was being
  // shown (of this kind), for its view to be replaced, else null.
  finish(id, kind) {
    if (typeof id !== "string" || id === "") return null;
    const stream = this.live.get(id);
    if (stream !== undefined && stream.kind !== kind) return null;
    this.forget(id);
    if (stream === undefined) return null;
    clearTimeout(stream.timer);
    return stream;
  }

  // Stops showing a live stream: its partial text is dropped.
  end(stream, why) {
    if (this.live.get(stream.id) !== stream) return;
    clearTimeout(stream.timer);
    this.forget(stream.id);
    this.drop(stream, why);
  }

  // Every live stream dropped (the page leaves the room).
  reset(why = "reset") {
    for (const stream of [...this.live.values()]) this.end(stream, why);
  }

  watch(stream) {
    clearTimeout(stream.timer);
    stream.timer = setTimeout(() => this.end(stream, "idle"), this.idleMs);
  }

  forget(id) {
    this.live.delete(id);
    this.ended.delete(id);
    this.ended.add(id);
    if (this.ended.size > ENDED_KEPT) this.ended.delete(this.ended.values().next().value);
  }
}
