/* OHIF Viewer 3 configuration for a dicomfs static DICOMweb tree served at /dicomweb by nginx
 * (docs/nginx/dicomweb.conf and docs/nginx/ohif.conf): save as app-config.js in OHIF's folder.
 * docs/serving.md explains every setting. (`dicomfs serve --viewer` writes its own.) */
window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  investigationalUseDialog: { option: 'never' },
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  defaultDataSourceName: 'dicomfs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomfs',
      configuration: {
        friendlyName: 'dicomfs static DICOMweb',
        name: 'dicomfs',
        wadoUriRoot: window.location.origin + '/dicomweb',
        qidoRoot: window.location.origin + '/dicomweb',
        wadoRoot: window.location.origin + '/dicomweb',
        staticWado: true,
        enableStudyLazyLoad: true,
        qidoSupportsIncludeField: false,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        supportsReject: false,
        supportsStow: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        singlepart: 'bulkdata,video',
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
