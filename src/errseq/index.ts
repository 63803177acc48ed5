export * from './errseq.js';
