/*
 * rlops' adaptive batcher for TorchServe 0.12: a request that finds a worker idle goes to it at once;
 * a worker that finds several requests already waiting fills its batch, up to maxBatchDelay.
 *
 * TorchServe's own batcher waits up to maxBatchDelay (at least 1 ms) for every batch that is not
 * full, so with one client each request pays the whole delay. Here a worker that becomes free takes
 * what is queued; only when several requests were queued already (the server is busy, and more are
 * on the way) does it wait, at most maxBatchDelay, for the batch to fill. One client gets batch-1 latency;
 * under load the batches are as full as TorchServe's, which on a small machine matters: a worker
 * that takes half a batch uses more CPU per request.
 *
 * TorchServe picks its batcher by the model config, with no way to name a class, so rlops ships
 * this class under the name of the one that `continuousBatching: true` selects. rlops starts the
 * frontend in a directory that holds this class; the launcher puts "." first on the class path, so
 * it is loaded in place of TorchServe's own. rlops models never stream, which is what TorchServe's
 * class is for. rlops_server.torchserve.config installs it and sets the flag. Built with
 * `make frontend-class`; the test suite checks that the shipped class is built from this file.
 */
package org.pytorch.serve.wlm;

import java.lang.reflect.Field;
import java.util.Map;
import java.util.concurrent.LinkedBlockingDeque;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.locks.ReentrantLock;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.util.messages.WorkerCommands;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

public class ContinuousBatching extends BatchAggregator {

    private static final Logger logger = LoggerFactory.getLogger(ContinuousBatching.class);

    /** The model's queue of inference requests (shared by its workers). */
    private final LinkedBlockingDeque<Job> queue;

    /** The model's lock: one worker at a time takes a batch, so batches are not split. */
    private final ReentrantLock lock;

    public ContinuousBatching(Model model) {
        super(model);
        try {
            Field db = Model.class.getDeclaredField("jobsDb");
            db.setAccessible(true);
            @SuppressWarnings("unchecked")
            Map<String, LinkedBlockingDeque<Job>> jobsDb =
                    (Map<String, LinkedBlockingDeque<Job>>) db.get(model);
            queue = jobsDb.get(Model.DEFAULT_DATA_QUEUE);
            Field lockField = Model.class.getDeclaredField("lock");
            lockField.setAccessible(true);
            lock = (ReentrantLock) lockField.get(model);
        } catch (ReflectiveOperationException | ClassCastException e) {
            throw new IllegalStateException(
                    "rlops adaptive batcher: this TorchServe frontend is not 0.12.0 (" + e + ")", e);
        }
        if (queue == null || lock == null) {
            throw new IllegalStateException(
                    "rlops adaptive batcher: model " + model.getModelName() + " has no request queue");
        }
        logger.info(
                "rlops adaptive batcher for model {} version {}, batch size up to {}, "
                        + "filled for up to {} ms when requests wait",
                model.getModelName(),
                model.getVersion(),
                model.getBatchSize(),
                model.getMaxBatchDelay());
    }

    @Override
    public void pollBatch(String threadName, WorkerState state) throws InterruptedException {
        // Management commands addressed to this worker come first, as in TorchServe's batcher.
        long wait = state == WorkerState.WORKER_MODEL_LOADED ? 0 : Long.MAX_VALUE;
        if (model.pollMgmtJob(threadName, wait, jobs)) {
            return;
        }
        if (model.isUseJobTicket()) {
            model.incNumJobTickets();
        }
        lock.lockInterruptibly();
        try {
            Job first = queue.poll();
            // More than one request was waiting for this worker: the server is busy and more are on
            // the way. One waiting request is not enough: a client that sends its next request as
            // soon as it has an answer can get it queued before this worker is back here, and it
            // must not pay the delay for requests that will never come.
            boolean busy = first != null && queue.peek() != null;
            if (first == null) {
                first = queue.take();
            }
            jobs.put(first.getJobId(), first);
            if (first.getCmd() == WorkerCommands.DESCRIBE) {
                return; // a describe request travels alone
            }
            long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(model.getMaxBatchDelay());
            int room = model.getBatchSize() - 1;
            while (room > 0) {
                Job next = queue.poll();
                if (next == null && busy) {
                    long left = deadline - System.nanoTime();
                    if (left > 0) {
                        next = queue.poll(left, TimeUnit.NANOSECONDS);
                    }
                }
                if (next == null) {
                    break;
                }
                if (next.getCmd() == WorkerCommands.DESCRIBE) {
                    queue.addFirst(next);
                    break;
                }
                if (next.getPayload().getClientExpireTS() > System.currentTimeMillis()) {
                    jobs.put(next.getJobId(), next);
                    room--;
                } else {
                    logger.warn(
                            "Drop inference request {} due to client timeout",
                            next.getPayload().getRequestId());
                }
            }
        } finally {
            lock.unlock();
        }
    }
}
